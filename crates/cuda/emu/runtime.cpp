// The emulator's scheduler: runs a launch block by block, one OS thread (from a reused pool) per
// CUDA thread, and implements the collectives declared in shim.h.
//
// The threads of a block take turns: exactly one runs at a time, until it reaches a collective
// (`__syncthreads`, a warp operation) or exits, then hands the turn to the next ready thread.
// Each phase between collectives runs the threads in descending index order. This makes every
// run deterministic and free of data races on the host, makes a missing `__syncthreads` show up
// every time (a thread reads shared memory its neighbours have not written yet, still NaN), and
// turns a deadlock (every live thread waiting at a collective that cannot complete) into an
// immediate error instead of a hang.
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "shim.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {
namespace {

// Thrown inside kernel threads to unwind them once the launch has failed.
struct Abort {};

std::string where(Site s) { return std::string(s.file) + ":" + std::to_string(s.line); }
bool same_site(Site a, Site b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

// The threads expected at one collective (the block's barrier or one warp's) and those waiting.
struct Gate {
    int expected = 0;
    std::vector<int> waiting;
    Site first{};
};

class Launch {
   public:
    Launch(dim3 block, std::size_t shared_bytes)
        : threads_(static_cast<int>(block.x * block.y * block.z)),
          shared_(shared_bytes + 1),
          warps_((threads_ + 31) / 32),
          state_(threads_) {
        for (int t = 0; t < threads_; ++t) turns_.push_back(std::make_unique<std::binary_semaphore>(0));
    }

    int threads() const { return threads_; }
    void* shared() { return shared_.data(); }
    bool failed() {
        std::lock_guard lock(mutex_);
        return failed_;
    }
    std::string error() {
        std::lock_guard lock(mutex_);
        return error_;
    }

    // Resets per-block state and gives the first thread its turn; call before starting threads.
    void start_block(const std::vector<std::pair<void*, std::size_t>>& statics) {
        std::lock_guard lock(mutex_);
        std::memset(shared_.data(), 0xff, shared_.size());
        for (auto [p, n] : statics) std::memset(p, 0xff, n);
        block_gate_ = Gate{threads_, {}, {}};
        for (std::size_t w = 0; w < warps_.size(); ++w) {
            int lanes = std::min(32, threads_ - static_cast<int>(w) * 32);
            warps_[w].gate = Gate{lanes, {}, {}};
            warps_[w].live = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
        }
        ready_.clear();
        for (int t = threads_ - 1; t >= 0; --t) {
            ready_.push_back(t);
            state_[t] = State::Ready;
        }
        unfinished_ = threads_;
        hand_off_locked();
    }

    // First thing a kernel thread does: wait for its turn.
    void begin_thread(int t) { wait_turn(t); }

    void end_thread(int t) {
        std::lock_guard lock(mutex_);
        if (failed_) return;
        state_[t] = State::Done;
        --unfinished_;
        leave_gate_locked(block_gate_);
        Warp& w = warps_[t / 32];
        w.live &= ~(1u << (t % 32));
        leave_gate_locked(w.gate);
        hand_off_locked();
    }

    [[noreturn]] void fail(const std::string& message) {
        std::lock_guard lock(mutex_);
        fail_locked(message);
    }

    void syncthreads(int t, Site site) { arrive(block_gate_, t, site, "__syncthreads"); }

    void syncwarp(int t, unsigned mask, Site site) {
        Warp& w = warps_[t / 32];
        check_mask(w, mask, site);
        arrive(w.gate, t, site, "warp collective");
    }

    std::uint64_t exchange(int t, unsigned mask, std::uint64_t value, int src, Site site) {
        Warp& w = warps_[t / 32];
        check_mask(w, mask, site);
        w.slots[t % 32] = value;
        arrive(w.gate, t, site, "warp collective");
        std::uint64_t out = value;
        if (src >= 0) {
            if (!((w.live >> src) & 1u)) fail("warp shuffle at " + where(site) + " reads inactive lane " + std::to_string(src));
            out = w.slots[src];
        }
        // No lane may publish its next value before every lane has read this one.
        arrive(w.gate, t, site, "warp collective");
        return out;
    }

    unsigned ballot(int t, unsigned mask, bool pred, Site site) {
        Warp& w = warps_[t / 32];
        check_mask(w, mask, site);
        w.slots[t % 32] = pred;
        arrive(w.gate, t, site, "warp collective");
        unsigned out = 0;
        for (int l = 0; l < 32; ++l)
            if (((w.live >> l) & 1u) && w.slots[l]) out |= 1u << l;
        arrive(w.gate, t, site, "warp collective");
        return out & mask;
    }

   private:
    enum class State { Ready, Running, Waiting, Done };
    struct Warp {
        Gate gate;
        std::uint64_t slots[32];
        unsigned live = 0;
    };

    void wait_turn(int t) {
        turns_[t]->acquire();
        std::lock_guard lock(mutex_);
        if (failed_) throw Abort{};
    }

    void arrive(Gate& g, int t, Site site, const char* what) {
        {
            std::lock_guard lock(mutex_);
            if (failed_) throw Abort{};
            if (g.waiting.empty()) {
                g.first = site;
            } else if (!same_site(g.first, site)) {
                fail_locked(std::string("divergent ") + what + ": threads of one " +
                            (&g == &block_gate_ ? "block" : "warp") + " wait at " + where(g.first) + " and at " +
                            where(site));
            }
            g.waiting.push_back(t);
            state_[t] = State::Waiting;
            if (static_cast<int>(g.waiting.size()) >= g.expected) release_gate_locked(g);
            hand_off_locked();
        }
        wait_turn(t);
    }

    // A thread left (exited): the gate may now be complete for those still waiting.
    void leave_gate_locked(Gate& g) {
        --g.expected;
        if (!g.waiting.empty() && static_cast<int>(g.waiting.size()) >= g.expected) release_gate_locked(g);
    }

    void release_gate_locked(Gate& g) {
        std::sort(g.waiting.begin(), g.waiting.end(), std::greater<int>());
        for (int w : g.waiting) {
            ready_.push_back(w);
            state_[w] = State::Ready;
        }
        g.waiting.clear();
    }

    void hand_off_locked() {
        if (!ready_.empty()) {
            int next = ready_.front();
            ready_.pop_front();
            state_[next] = State::Running;
            turns_[next]->release();
        } else if (unfinished_ > 0) {
            fail_locked("deadlock: every live thread waits at a collective that cannot complete (block barrier " +
                        (block_gate_.waiting.empty() ? std::string("empty") : "waited at " + where(block_gate_.first)) + ")");
        }
    }

    // Records the first error and wakes every thread that is not running so that it unwinds.
    [[noreturn]] void fail_locked(const std::string& message) {
        if (!failed_) {
            failed_ = true;
            error_ = message;
            for (int t = 0; t < threads_; ++t)
                if (state_[t] == State::Ready || state_[t] == State::Waiting) {
                    turns_[t]->release();
                    state_[t] = State::Done;
                }
        }
        throw Abort{};
    }

    // Partial-mask warp operations are outside what the emulator models: every live lane must
    // take part.
    void check_mask(Warp& w, unsigned mask, Site site) {
        std::lock_guard lock(mutex_);
        if ((mask & w.live) != w.live)
            fail_locked("warp operation at " + where(site) + " with a mask that leaves out live lanes (unsupported)");
    }

    int threads_;
    std::vector<unsigned char> shared_;
    std::vector<Warp> warps_;
    std::vector<State> state_;
    std::vector<std::unique_ptr<std::binary_semaphore>> turns_;
    std::mutex mutex_;
    Gate block_gate_;
    std::deque<int> ready_;
    int unfinished_ = 0;
    bool failed_ = false;
    std::string error_;
};

// Persistent worker threads; `run(n, task)` runs task(0..n) on n of them and waits.
class Pool {
   public:
    ~Pool() {
        {
            std::lock_guard lock(mutex_);
            stopping_ = true;
            ++generation_;
        }
        start_.notify_all();
        for (auto& t : threads_) t.join();
    }

    void run(int n, const std::function<void(int)>& task) {
        std::unique_lock lock(mutex_);
        while (static_cast<int>(threads_.size()) < n) {
            int index = static_cast<int>(threads_.size());
            threads_.emplace_back([this, index] { work(index); });
        }
        task_ = &task;
        active_ = n;
        remaining_ = n;
        ++generation_;
        start_.notify_all();
        done_.wait(lock, [&] { return remaining_ == 0; });
        task_ = nullptr;
    }

   private:
    void work(int index) {
        std::unique_lock lock(mutex_);
        // Created inside run() before it bumped the generation, and first locks after the bump:
        // take part in that generation.
        std::uint64_t seen = generation_ - 1;
        for (;;) {
            start_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (stopping_) return;
            if (index >= active_) continue;
            const auto* task = task_;
            lock.unlock();
            (*task)(index);
            lock.lock();
            if (--remaining_ == 0) done_.notify_all();
        }
    }

    std::mutex mutex_;
    std::condition_variable start_, done_;
    std::vector<std::thread> threads_;
    const std::function<void(int)>* task_ = nullptr;
    std::uint64_t generation_ = 0;
    int active_ = 0;
    int remaining_ = 0;
    bool stopping_ = false;
};

Launch* current_launch = nullptr;
thread_local int thread_rank = 0;  // linear thread index within the block

std::mutex statics_mutex;
std::vector<std::pair<void*, std::size_t>> statics;

}  // namespace

void syncthreads(Site site) { current_launch->syncthreads(thread_rank, site); }
void syncwarp(unsigned mask, Site site) { current_launch->syncwarp(thread_rank, mask, site); }
std::uint64_t exchange(unsigned mask, std::uint64_t value, int src, Site site) {
    return current_launch->exchange(thread_rank, mask, value, src, site);
}
unsigned ballot(unsigned mask, bool pred, Site site) { return current_launch->ballot(thread_rank, mask, pred, site); }
int lane_id() { return thread_rank % 32; }
void* dynamic_shared() { return current_launch->shared(); }
void fail(const char* message) { current_launch->fail(message); }

void register_static_shared(void* storage, std::size_t bytes) {
    std::memset(storage, 0xff, bytes);
    std::lock_guard lock(statics_mutex);
    statics.emplace_back(storage, bytes);
}

const KernelEntry* find_kernel(const char* name);

}  // namespace emu

namespace {
std::mutex launch_mutex;  // launches run one at a time: shared memory is process-wide storage
emu::Pool& pool() {
    static emu::Pool p;
    return p;
}
}  // namespace

// Status codes shared with src/emulator.rs.
enum : int { kOk = 0, kUnknownKernel = 1, kBadConfig = 2, kKernelFault = 3 };

extern "C" int emu_launch(const char* name, const unsigned grid[3], const unsigned block[3], std::size_t shared_bytes,
                          void** args, char* error, std::size_t error_len) {
    auto report = [&](int code, const std::string& message) {
        std::snprintf(error, error_len, "%s", message.c_str());
        return code;
    };
    const emu::KernelEntry* kernel = emu::find_kernel(name);
    if (!kernel) return report(kUnknownKernel, std::string("no kernel named ") + name);
    dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
    std::uint64_t threads = std::uint64_t(b.x) * b.y * b.z;
    if (threads == 0 || threads > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535)
        return report(kBadConfig, "invalid launch configuration for " + std::string(name));
    if (shared_bytes > 227 * 1024) return report(kBadConfig, "dynamic shared memory over the H100's 227 KiB");

    std::lock_guard lock(launch_mutex);
    emu::Launch launch(b, shared_bytes);
    emu::current_launch = &launch;
    for (unsigned bz = 0; bz < g.z && !launch.failed(); ++bz)
        for (unsigned by = 0; by < g.y && !launch.failed(); ++by)
            for (unsigned bx = 0; bx < g.x && !launch.failed(); ++bx) {
                {
                    std::lock_guard statics_lock(emu::statics_mutex);
                    launch.start_block(emu::statics);
                }
                pool().run(launch.threads(), [&](int t) {
                    emu::thread_rank = t;
                    threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
                    blockIdx = {bx, by, bz};
                    blockDim = b;
                    gridDim = g;
                    try {
                        launch.begin_thread(t);
                        kernel->launch(args);
                        launch.end_thread(t);
                    } catch (const emu::Abort&) {
                    } catch (const std::exception& e) {
                        try {
                            launch.fail(std::string("exception in kernel: ") + e.what());
                        } catch (const emu::Abort&) {
                        }
                    }
                });
            }
    emu::current_launch = nullptr;
    if (launch.failed()) return report(kKernelFault, std::string(name) + ": " + launch.error());
    return kOk;
}
