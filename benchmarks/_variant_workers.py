"""Timing each variant of a benchmark in a process of its own, the processes driven in turn.

Timed in one process, the variants share one heap: what one variant's calls leave in the
allocator changes what the next one's allocations cost. ``bench_explain.py`` measured it
(captum's call on ConvNeXt-T, one triplet, 0.258 s in a process without pytorch-grad-cam and
0.199 s in one where pytorch-grad-cam had run). Here each variant lives in a worker process
started for it (``spawn``, so nothing is inherited but the arguments), and the coordinator
asks one worker at a time for one timed call while the others wait on their pipes: the
variants still take turns on the same cores, in the rotated order of
:func:`_measure.interleaved`, and none of them shapes another's heap. Each then pays the
page faults of its own allocations, which with glibc's defaults are a large part of a
call (see ``_measure.retain_freed_memory``): this measures what a process running one
variant alone sees, not the variants' work.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch

from _measure import interleaved, time_call

#: ``make(spec) -> (run, after, prepared_seconds)``: a worker's call, what to do after each
#: call (outside the timed region) and the seconds its preparation took. Module-level, so
#: that a spawned process can import it.
Maker = Callable[[dict], tuple[Callable[[], Any], Callable[[], None], float]]


def _serve(conn: Connection, make: Maker, spec: dict) -> None:
    try:
        torch.set_num_threads(spec["threads"])
        run, after, prepared = make(spec)
    except BaseException as error:  # noqa: BLE001 - reported to the coordinator
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", prepared))
    while conn.recv() == "time":
        seconds = time_call(run, torch.device("cpu"))
        after()
        conn.send(seconds)


class VariantWorkers:
    """One worker process per variant; :meth:`times` runs them interleaved.

    ``specs`` maps each variant to the spec its worker builds from with ``make``.
    """

    def __init__(self, make: Maker, specs: dict[str, dict]) -> None:
        context = multiprocessing.get_context("spawn")
        self.prepared: dict[str, float] = {}
        self._pipes: dict[str, Connection] = {}
        self._processes = []
        try:
            for name, spec in specs.items():
                here, there = context.Pipe()
                process = context.Process(target=_serve, args=(there, make, spec), daemon=True)
                process.start()
                self._pipes[name] = here
                self._processes.append(process)
                # one at a time: a worker prepares (builds, settles) alone on the cores
                status, value = here.recv()
                if status != "ready":
                    raise RuntimeError(f"the {name} worker failed to start: {value}")
                self.prepared[name] = value
        except BaseException:
            self.close()
            raise

    def time(self, name: str) -> float:
        """Seconds of one call of ``name``, timed in its worker."""
        self._pipes[name].send("time")
        return self._pipes[name].recv()

    def times(self, repeats: int, warm_up: bool = True) -> dict[str, list[float]]:
        """Every variant's seconds, ``repeats`` times, interleaved."""
        return interleaved(list(self._pipes), repeats, self.time, warm_up)

    def close(self) -> None:
        for pipe in self._pipes.values():
            try:
                pipe.send("stop")
            except OSError:
                pass
        for process in self._processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()

    def __enter__(self) -> "VariantWorkers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
