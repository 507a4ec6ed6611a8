"""Atomic writes for every local file mmengine puts: Runner checkpoints (iter_N.pth), last_checkpoint, best_*.pth.

mmengine's save_checkpoint serialises into memory and hands the bytes to the file backend's `put`, and the
CheckpointHook writes `last_checkpoint` with `put_text`; LocalBackend opens the target itself with 'wb'/'w', so a crash
mid-write leaves a torn checkpoint under the real name, which --resume then picks. This backend writes each through
mae_transfer.checkpoints.atomic_path and replaces LocalBackend as the handler of local paths (mmengine's prefix ''),
which importing mae_transfer.seg (`custom_imports`) registers before the Runner builds its hooks.
"""
from mmengine.fileio import LocalBackend, register_backend

from ..checkpoints import atomic_path

__all__ = ["AtomicLocalBackend"]


@register_backend("local", force=True, prefixes="")
class AtomicLocalBackend(LocalBackend):
    """LocalBackend whose put and put_text write a temporary file beside the target, then rename it into place."""

    def put(self, obj: bytes, filepath) -> None:
        with atomic_path(filepath) as tmp:
            super().put(obj, tmp)

    def put_text(self, obj: str, filepath, encoding: str = "utf-8") -> None:
        with atomic_path(filepath) as tmp:
            super().put_text(obj, tmp, encoding)
