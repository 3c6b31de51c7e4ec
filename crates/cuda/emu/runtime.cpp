// The emulator's scheduler: runs a launch block by block on the calling OS thread, each CUDA
// thread as a fiber (its own stack, switched in user space), and implements the collectives
// declared in shim.h.
//
// The threads of a block take turns: exactly one runs at a time, until it reaches a collective
// (`__syncthreads`, a warp operation) or exits, then yields to the scheduler, which resumes the
// next ready thread. Each phase between collectives runs the threads in descending index order.
// This makes every run deterministic and free of data races on the host, makes a missing
// `__syncthreads` show up every time (a thread reads shared memory its neighbours have not written
// yet, still NaN), and turns a deadlock (every live thread waiting at a collective that cannot
// complete) into an immediate error instead of a hang.
//
// Why fibers: a thread switch costs a few nanoseconds here against microseconds for an OS-thread
// hand-off, so a barrier-heavy GEMM or attention launch runs at the speed of its arithmetic.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "shim.h"

#if !(defined(__x86_64__) && defined(__ELF__))
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {
namespace {

// ---- Fibers: a saved context, creation on a given stack, and a switch ------------------------

#if defined(__x86_64__) && defined(__ELF__)
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores the
// stack pointer in *save, loads `load` and restores the same from there. Everything else is
// caller-saved under the System V ABI, so the compiler has already spilled it.
extern "C" void emu_switch(void** save, void* load);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

struct Context {
    void* sp = nullptr;
};

// Lays out a frame that `emu_switch` "returns" from into `entry`, with the stack aligned as if
// `entry` had been called.
void make_context(Context& c, char* stack_top, void (*entry)()) {
    auto* sp = reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::uintptr_t>(stack_top) & ~std::uintptr_t{15});
    *--sp = 0;                                          // entry's return address: it never returns
    *--sp = reinterpret_cast<std::uint64_t>(entry);     // popped by emu_switch's `ret`
    for (int r = 0; r < 6; ++r) *--sp = 0;              // rbp rbx r12 r13 r14 r15
    std::uint32_t mxcsr;
    std::uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = mxcsr | (std::uint64_t{fpucw} << 32);
    c.sp = sp;
}

inline void switch_context(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }
#else
// Portable fallback: slower (swapcontext saves the signal mask with a system call) but the same.
struct Context {
    ucontext_t uc;
};

constexpr std::size_t kStackBytes = 256 * 1024;

void make_context(Context& c, char* stack_top, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack_top - kStackBytes;
    c.uc.uc_stack.ss_size = kStackBytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Fiber stacks, mapped once and reused by every launch: 256 KiB each (wmma fragments hold whole
// tiles per lane), reserved without backing until touched, with a guard page below each so that
// an overflow faults instead of corrupting a neighbour.
class Stacks {
   public:
    static constexpr std::size_t kBytes = 256 * 1024;

    char* top(int fiber) {
        while (static_cast<int>(tops_.size()) <= fiber) {
            std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
            void* base = mmap(nullptr, kBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                              -1, 0);
            if (base == MAP_FAILED) return nullptr;
            mprotect(base, page, PROT_NONE);
            tops_.push_back(static_cast<char*>(base) + page + kBytes);
        }
        return tops_[fiber];
    }

   private:
    std::vector<char*> tops_;
};

// ---- One launch ----------------------------------------------------------------------------

// Thrown inside a fiber to unwind it to its entry once the launch has failed.
struct Abort {};

std::string where(Site s) { return std::string(s.file) + ":" + std::to_string(s.line); }
bool same_site(Site a, Site b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

// The threads expected at one collective (the block's barrier or one warp's) and those waiting.
struct Gate {
    int expected = 0;
    std::vector<int> waiting;
    Site first{};
};

class Launch;
Launch* current_launch = nullptr;
int thread_rank = 0;  // linear index of the running thread within its block

class Launch {
   public:
    Launch(const KernelEntry* kernel, void** args, dim3 grid, dim3 block, std::size_t shared_bytes, Stacks& stacks)
        : kernel_(kernel),
          args_(args),
          grid_(grid),
          block_(block),
          threads_(static_cast<int>(block.x * block.y * block.z)),
          shared_(shared_bytes + 1),
          warps_((threads_ + 31) / 32),
          fibers_(threads_),
          stacks_(stacks) {}

    // Runs every block in order; false (with `error()`) at the first failure.
    bool run(const std::vector<std::pair<void*, std::size_t>>& statics) {
        for (unsigned z = 0; z < grid_.z && !failed_; ++z)
            for (unsigned y = 0; y < grid_.y && !failed_; ++y)
                for (unsigned x = 0; x < grid_.x && !failed_; ++x) run_block({x, y, z}, statics);
        return !failed_;
    }

    const std::string& error() const { return error_; }
    void* shared() { return shared_.data(); }

    // Collectives, called from the running fiber.
    void syncthreads(Site site) { arrive(block_gate_, site, "__syncthreads"); }

    void syncwarp(unsigned mask, Site site) {
        Warp& w = warp();
        check_mask(w, mask, site);
        arrive(w.gate, site, "warp collective");
    }

    std::uint64_t exchange(unsigned mask, std::uint64_t value, int src, Site site) {
        Warp& w = warp();
        check_mask(w, mask, site);
        w.slots[thread_rank % 32] = value;
        arrive(w.gate, site, "warp collective");
        std::uint64_t out = value;
        if (src >= 0) {
            if (!((w.live >> src) & 1u)) fail("warp shuffle at " + where(site) + " reads inactive lane " + std::to_string(src));
            out = w.slots[src];
        }
        // No lane may publish its next value before every lane has read this one.
        arrive(w.gate, site, "warp collective");
        return out;
    }

    unsigned ballot(unsigned mask, bool pred, Site site) {
        Warp& w = warp();
        check_mask(w, mask, site);
        w.slots[thread_rank % 32] = pred;
        arrive(w.gate, site, "warp collective");
        unsigned out = 0;
        for (int l = 0; l < 32; ++l)
            if (((w.live >> l) & 1u) && w.slots[l]) out |= 1u << l;
        arrive(w.gate, site, "warp collective");
        return out & mask;
    }

    // Records the first error and unwinds the running fiber.
    [[noreturn]] void fail(const std::string& message) {
        record_failure(message);
        throw Abort{};
    }

   private:
    struct Warp {
        Gate gate;
        std::uint64_t slots[32];
        unsigned live = 0;
    };

    Warp& warp() { return warps_[thread_rank / 32]; }

    void record_failure(const std::string& message) {
        if (!failed_) {
            failed_ = true;
            error_ = message;
        }
    }

    void run_block(uint3 index, const std::vector<std::pair<void*, std::size_t>>& statics) {
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
            char* top = stacks_.top(t);
            if (!top) return record_failure("cannot map a fiber stack for thread " + std::to_string(t));
            make_context(fibers_[t], top, fiber_main);
            ready_.push_back(t);
        }
        unfinished_ = threads_;
        blockIdx = index;
        blockDim = block_;
        gridDim = grid_;
        while (!ready_.empty() && !failed_) {
            int t = ready_.front();
            ready_.pop_front();
            resume(t);
        }
        if (!failed_ && unfinished_ > 0)
            record_failure("deadlock: every live thread waits at a collective that cannot complete (block barrier " +
                           (block_gate_.waiting.empty() ? std::string("empty") : "waited at " + where(block_gate_.first)) +
                           ")");
    }

    void resume(int t) {
        thread_rank = t;
        threadIdx = {t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y)};
        switch_context(scheduler_, fibers_[t]);
    }

    void yield() { switch_context(fibers_[thread_rank], scheduler_); }

    // Every fiber's body: the kernel, then exit; control never comes back here.
    static void fiber_main() {
        Launch& l = *current_launch;
        try {
            l.kernel_->launch(l.args_);
        } catch (const Abort&) {
        } catch (const std::exception& e) {
            l.record_failure(std::string("exception in kernel: ") + e.what());
        }
        l.exit_thread();
    }

    [[noreturn]] void exit_thread() {
        int t = thread_rank;
        --unfinished_;
        leave_gate(block_gate_);
        Warp& w = warp();
        w.live &= ~(1u << (t % 32));
        leave_gate(w.gate);
        yield();
        __builtin_unreachable();
    }

    void arrive(Gate& g, Site site, const char* what) {
        if (g.waiting.empty()) {
            g.first = site;
        } else if (!same_site(g.first, site)) {
            fail(std::string("divergent ") + what + ": threads of one " + (&g == &block_gate_ ? "block" : "warp") +
                 " wait at " + where(g.first) + " and at " + where(site));
        }
        g.waiting.push_back(thread_rank);
        if (static_cast<int>(g.waiting.size()) >= g.expected) release_gate(g);
        yield();
    }

    // A thread exited: the gate may now be complete for those still waiting.
    void leave_gate(Gate& g) {
        --g.expected;
        if (!g.waiting.empty() && static_cast<int>(g.waiting.size()) >= g.expected) release_gate(g);
    }

    void release_gate(Gate& g) {
        std::sort(g.waiting.begin(), g.waiting.end(), std::greater<int>());
        for (int w : g.waiting) {
            ready_.push_back(w);
        }
        g.waiting.clear();
    }

    // Partial-mask warp operations are outside what the emulator models: every live lane must
    // take part.
    void check_mask(Warp& w, unsigned mask, Site site) {
        if ((mask & w.live) != w.live)
            fail("warp operation at " + where(site) + " with a mask that leaves out live lanes (unsupported)");
    }

    const KernelEntry* kernel_;
    void** args_;
    dim3 grid_, block_;
    int threads_;
    std::vector<unsigned char> shared_;
    std::vector<Warp> warps_;
    std::vector<Context> fibers_;
    Context scheduler_;
    Stacks& stacks_;
    Gate block_gate_;
    std::deque<int> ready_;
    int unfinished_ = 0;
    bool failed_ = false;
    std::string error_;
};

std::vector<std::pair<void*, std::size_t>> statics;

}  // namespace

void syncthreads(Site site) { current_launch->syncthreads(site); }
void syncwarp(unsigned mask, Site site) { current_launch->syncwarp(mask, site); }
std::uint64_t exchange(unsigned mask, std::uint64_t value, int src, Site site) {
    return current_launch->exchange(mask, value, src, site);
}
unsigned ballot(unsigned mask, bool pred, Site site) { return current_launch->ballot(mask, pred, site); }
int lane_id() { return thread_rank % 32; }
void* dynamic_shared() { return current_launch->shared(); }
void fail(const char* message) { current_launch->fail(message); }

// Called only under `launch_mutex` (static shared variables register on their kernel's first run).
void register_static_shared(void* storage, std::size_t bytes) {
    std::memset(storage, 0xff, bytes);
    statics.emplace_back(storage, bytes);
}

const KernelEntry* find_kernel(const char* name);

}  // namespace emu

namespace {
// Launches run one at a time: the scheduler state, the fiber stacks and static shared memory are
// process-wide.
std::mutex launch_mutex;
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
    static emu::Stacks stacks;
    emu::Launch launch(kernel, args, g, b, shared_bytes, stacks);
    emu::current_launch = &launch;
    bool ok = launch.run(emu::statics);
    emu::current_launch = nullptr;
    if (!ok) return report(kKernelFault, std::string(name) + ": " + launch.error());
    return kOk;
}
