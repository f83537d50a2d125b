"""Event-loop CPU per infer request without sockets: `python -m bench.protocol [--model mlp] [--format json]`.

Builds the app in-process and feeds requests to Kiln's protocol (`service/http_protocol.py`) the way
uvloop does: `get_buffer` / `buffer_updated` on 32 connections, into a transport whose writes are
dropped. The main thread's CPU time per request is the Python (and copy) cost of the HTTP, guard,
decode, batcher and response path, free of the kernel's socket work and of machine noise, so small
changes to that path can be compared (`taskset -c 0` for a steady core). The model still runs (inline
on this thread for a cheap model, on its runner thread otherwise: that thread's CPU per request is
printed apart, to compare with in-process ONNX Runtime).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import time

from bench import http, models


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data) -> None:
        self.writes += 1

    def writelines(self, data) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp", choices=sorted(models.INPUT_SHAPES))
    ap.add_argument("--format", default="binary", choices=["json", "binary"])
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--requests", type=int, default=0, help="per repetition (default: by model size)")
    ap.add_argument("--read", type=int, default=256 * 1024, help="bytes per simulated socket read")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = ap.parse_args()

    import uvicorn
    from uvicorn.server import ServerState

    from service.app import create_app
    from service.guard import wrap
    from service.http_protocol import KilnConnection
    from service.settings import Settings

    repo = models.build_repo([args.model])
    settings = Settings(model_repo=str(repo), cache_dir=str(http.WORK / "cache"), models=args.model)
    app = wrap(create_app(settings), settings)
    app.state.repository.load_all()
    path, hlen, ctype = http.bodies(args.model)[args.format]
    body = path.read_bytes()
    request = (f"POST /v2/models/{args.model}/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: {ctype}\r\n"
               + (f"Inference-Header-Content-Length: {hlen}\r\n" if hlen else "")
               + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    per_rep = args.requests or (32_000 if len(body) < 100_000 else 640)

    async def run() -> None:
        config = uvicorn.Config(app, http=KilnConnection, loop="uvloop", log_level="warning", proxy_headers=False)
        config.load()
        state = ServerState()
        conns = []
        for _ in range(args.connections):
            conn, transport = KilnConnection(config, state, {}), _Transport()
            conn.connection_made(transport)
            conns.append((conn, transport))
        view = memoryview(request)

        async def feed(n: int) -> None:
            for _ in range(max(1, n // len(conns))):
                for conn, _ in conns:
                    i = 0
                    while i < len(request):  # what uvloop does for a BufferedProtocol
                        buf = conn.get_buffer(-1)
                        k = min(len(buf), len(request) - i, args.read)
                        buf[:k] = view[i:i + k]
                        conn.buffer_updated(k)
                        i += k
                while state.tasks:
                    await asyncio.wait(list(state.tasks))

        await feed(per_rep // 10)  # warm-up
        full_gcs: list[float] = []  # full (generation 2) collections while measuring: event-loop stalls
        started = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            elif info["generation"] == 2:
                full_gcs.append(time.perf_counter() - started[0])

        gc.callbacks.append(on_gc)
        prof = cProfile.Profile() if args.profile else None
        batcher = app.state.repository.get(args.model)._batcher  # noqa: SLF001
        runners = [] if batcher.inline else [time.pthread_getcpuclockid(w.thread.ident) for w in batcher.workers]
        for _ in range(3):
            t0 = time.thread_time()
            r0 = sum(time.clock_gettime(c) for c in runners)
            if prof:
                prof.enable()
            await feed(per_rep)
            if prof:
                prof.disable()
            runner = (f"; runner threads {(sum(time.clock_gettime(c) for c in runners) - r0) / per_rep * 1e6:.1f} µs"
                      if runners else "; the model runs inline on the event loop")
            print(f"{args.model} {args.format}: {(time.thread_time() - t0) / per_rep * 1e6:.1f} µs of event-loop "
                  f"CPU per request (no sockets{', under cProfile' if prof else ''}){runner}", flush=True)
        gc.callbacks.remove(on_gc)
        print(f"full garbage collections while measuring: {len(full_gcs)} in {3 * per_rep:,} requests"
              + (f", {sum(full_gcs) / len(full_gcs) * 1000:.1f} ms each on average" if full_gcs else "")
              + f" (KILN_GC_FREEZE={'on' if gc.get_freeze_count() else 'off'})")
        assert all(t.writes for _, t in conns), "some connection was never answered"
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    import uvloop

    uvloop.run(run())
    app.state.repository.close()


if __name__ == "__main__":
    main()
