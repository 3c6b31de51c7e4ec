"""A bounded closed-loop load generator on loopback.

    python loadgen.py --url http://127.0.0.1:8080 --concurrency 8 --requests 400 \
        --sentences FILE [--batch 1] [--seconds 60] [--warmup 16] [--json]

`concurrency` threads, each with one keep-alive connection, send `POST /embed {"inputs": [...]}`
back to back (each request the next `batch` sentences of FILE, one per line) until `requests`
have been answered in total or `seconds` have passed. Prints p50/p90/p99 latency, requests/s and
sentences/s, and counts answers by status (a non-200 is reported, never retried).
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def run(url, concurrency, requests, sentences, batch, seconds, warmup):
    u = urllib.parse.urlparse(url)
    bodies = [json.dumps({"inputs": sentences[i:i + batch]}).encode()
              for i in range(0, len(sentences) - batch + 1, batch)]
    lock = threading.Lock()
    issued = [0]
    latencies, statuses, errors = [], {}, []

    def worker(w):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        while True:
            with lock:
                n = issued[0]
                if n >= requests + warmup:
                    break
                issued[0] += 1
            if time.perf_counter() > deadline:
                break
            body = bodies[(n * 7919 + w) % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/embed", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except Exception as e:  # counted and reported; the connection is reopened
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
                continue
            dt = time.perf_counter() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if n >= warmup and status == 200:
                    latencies.append(dt)
                    if len(latencies) == 1:
                        started[0] = t0
        conn.close()

    started = [None]
    deadline = time.perf_counter() + seconds
    t_begin = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - (started[0] or t_begin)
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "batch": batch, "answered_200": len(lat),
        "statuses": statuses, "errors": len(errors), "first_error": errors[0] if errors else None,
        "p50_ms": percentile(lat, 0.50) * 1e3, "p90_ms": percentile(lat, 0.90) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "requests_per_s": len(lat) / elapsed if elapsed > 0 else 0.0,
        "sentences_per_s": len(lat) * batch / elapsed if elapsed > 0 else 0.0,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--sentences", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with open(a.sentences) as f:
        sentences = [l.rstrip("\n") for l in f if l.strip()]
    r = run(a.url, a.concurrency, a.requests, sentences, a.batch, a.seconds, a.warmup)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"c={r['concurrency']:>3} p50 {r['p50_ms']:.2f} ms  p90 {r['p90_ms']:.2f} ms  "
              f"p99 {r['p99_ms']:.2f} ms  {r['requests_per_s']:.1f} req/s  "
              f"{r['sentences_per_s']:.1f} sentences/s  statuses {r['statuses']}  "
              f"connection errors {r['errors']}" + (f" (first: {r['first_error']})" if r["errors"] else ""))


if __name__ == "__main__":
    main()
