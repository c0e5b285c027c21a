"""Several devices: one encoder process per device (``--devices cuda:0,cuda:1``); batches go
out tagged with an id and results are reassembled by that id."""

from __future__ import annotations

from typing import Any

from embedbatch.engines.local.model import LocalEncoder

__all__ = ["DevicePool", "device_worker"]


class DevicePool:
    """One encoder process per device; batches go out tagged with an id and come back by it."""

    def __init__(self, model: str, devices: tuple[str, ...], dtype: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.results: Any = ctx.Queue()
        self.inboxes: list[Any] = []
        self.procs = []
        for device in devices:
            inbox = ctx.Queue(maxsize=2)
            p = ctx.Process(target=device_worker, args=(model, device, dtype, inbox, self.results), daemon=True)
            p.start()
            self.inboxes.append(inbox)
            self.procs.append(p)
        self.in_flight = [0] * len(devices)
        ready = [self.results.get(timeout=600) for _ in devices]
        for r in ready:
            if isinstance(r, BaseException):
                self.close()
                raise r

    def submit(self, tag: int, batch: list[list[int]], pad_to: int | None) -> None:
        slot = min(range(len(self.inboxes)), key=lambda i: self.in_flight[i])
        self.in_flight[slot] += 1
        self.inboxes[slot].put((tag, slot, batch, pad_to))

    def get(self) -> tuple[int, Any]:
        tag, slot, result = self.results.get()
        self.in_flight[slot] -= 1
        if isinstance(result, BaseException):
            raise result
        return tag, result

    @property
    def busy(self) -> int:
        return sum(self.in_flight)

    @property
    def capacity(self) -> int:
        return 2 * len(self.inboxes)

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def device_worker(model: str, device: str, dtype: str, inbox: Any, results: Any) -> None:
    try:
        enc = LocalEncoder(model, device=device, dtype=dtype)
    except BaseException as exc:
        results.put(exc)
        return
    results.put(device)
    while (job := inbox.get()) is not None:
        tag, slot, batch, pad_to = job
        try:
            results.put((tag, slot, enc.encode_ids(batch, pad_to=pad_to)))
        except BaseException as exc:
            results.put((tag, slot, exc))
