"""Writing adapters to disk atomically: complete or absent, never half-written."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable


def export_lora_adapter(model, save_directory: str | os.PathLike) -> None:
    """Write the active units="lora" adapter at the top of ``save_directory``, atomically.

    Kept for code written before ``save_pretrained`` wrote units="lora" adapters as plain LoRA adapters (LoRA config,
    same tensors under the same keys, GreenTrainer's fields in ``greentrainer_config.json`` alongside): this is
    ``save_pretrained`` of the active adapter alone, which loads without this package.
    """
    active = model.base_model.active_adapters  # the tuner's: PeftModel.active_adapter hides a list set on the tuner
    if len(active) != 1:
        raise ValueError(f"{len(active)} adapters are active ({active}): choose the one to export with set_adapter.")
    name = active[0]
    if model.peft_config[name].units != "lora":
        raise ValueError("Only units='lora' adapters can be exported as LoRA; units='tensors' trained base tensors.")

    def write(directory: str) -> None:
        model.save_pretrained(directory, selected_adapters=[name])
        if name != "default":  # PEFT writes any other adapter into a subfolder named after it
            nested = os.path.join(directory, name)
            for entry in os.listdir(nested):
                os.replace(os.path.join(nested, entry), os.path.join(directory, entry))
            os.rmdir(nested)

    write_atomically(save_directory, write, keep_others=True)


def save_adapter(model, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained`` into a temporary sibling directory, swapped into place when complete.

    An interrupted save leaves the previous adapter (or nothing), never a half-written one; files of the directory
    that the save does not write (a tokenizer, other adapters' folders) stay. Like ``save_pretrained``, a process
    with ``is_main_process=False`` writes nothing, so every rank of a distributed run can call it.
    """
    if not kwargs.get("is_main_process", True):
        return
    write_atomically(save_directory, lambda directory: model.save_pretrained(directory, **kwargs), keep_others=True)


def write_atomically(target: str | os.PathLike, write: Callable[[str], None], keep_others: bool = False) -> None:
    """``write(directory)`` into a hidden sibling of ``target``, then swap it in on the same filesystem.

    Where the OS swaps two directories in one step (Linux's ``renameat2``), ``target`` is the old or the new complete
    directory at every point. Elsewhere the previous ``target`` is moved aside first and moved back if the second
    rename fails; a process killed between the two leaves it in a ``.old-<name>-*`` sibling, which the next write
    puts back first, and a process killed while writing leaves its ``.tmp-<name>-*`` sibling, which the next write
    removes (:func:`_recover`). With ``keep_others``, entries of the previous ``target`` that ``write`` did not
    produce are then moved into the new one (renames, so large folders cost nothing), and its model card
    (``README.md``) is given to ``write`` to update, as ``save_pretrained`` updates the one it finds.
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _recover(parent, name)
    staging = tempfile.mkdtemp(prefix=f".tmp-{name}-{_owner()}-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0o700 would hide the result from other users and services
    try:
        with open(os.path.join(staging, _NEW_CONTENT), "w") as marker:  # the new write, not the old content
            marker.write(_owner())
        card = os.path.join(target, MODEL_CARD)
        if keep_others and os.path.isfile(card):
            shutil.copy2(card, os.path.join(staging, MODEL_CARD))
        write(staging)
        if not os.path.isdir(target):
            os.replace(staging, target)
            os.remove(os.path.join(target, _NEW_CONTENT))
            return
        if _exchange(staging, target):
            backup = staging
        else:
            backup = tempfile.mkdtemp(prefix=f".old-{name}-{_owner()}-", dir=parent)
            os.rmdir(backup)
            os.replace(target, backup)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(backup, target)
                raise
        os.remove(os.path.join(target, _NEW_CONTENT))
    except BaseException:
        if os.path.isfile(os.path.join(staging, _NEW_CONTENT)):  # not swapped in: the new write, not the old
            shutil.rmtree(staging, ignore_errors=True)
        raise
    # an old file that shares a written file's stem is another format of it (adapter_model.bin next to a new
    # adapter_model.safetensors, which loaders would prefer): superseded, not carried over
    written = {os.path.splitext(entry)[0] for entry in os.listdir(target)}
    for entry in os.listdir(backup) if keep_others else ():
        if os.path.splitext(entry)[0] not in written:
            os.replace(os.path.join(backup, entry), os.path.join(target, entry))
    shutil.rmtree(backup, ignore_errors=True)


MODEL_CARD = "README.md"
# in a write's hidden sibling from its creation until it is swapped in: a sibling without it holds the previous content
_NEW_CONTENT = ".greentrainer-new-write"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(first: str, second: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or the
    filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), second)


def _recover(parent: str, name: str) -> None:
    """Tidy what writes of ``name`` killed by a signal left beside it (only those of processes known to be gone: of
    this host, by their pid; a write under way elsewhere is left alone).

    A previous ``name`` they moved aside is put back where ``name`` itself is missing; a new write that was not swapped
    in (it holds the marker ``_NEW_CONTENT``) is removed, so that preempted saves do not pile up copies of the adapter.
    Anything else (a sibling holding previous content, whose files a write was still carrying over) is left.
    """
    target = os.path.join(parent, name)
    left = os.path.join(target, _NEW_CONTENT)
    if os.path.isfile(left) and _gone(*_marker_owner(left)):  # killed just after its swap: complete, marker left
        os.remove(left)
    owned = re.compile(rf"\.(tmp|old)-{re.escape(name)}-([A-Za-z0-9_]+)\.([0-9]+)-[a-z0-9_]+")
    older = re.compile(rf"\.old-{re.escape(name)}-[a-z0-9_]+")  # named before owners were: not another name's
    aside = []
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        match = owned.fullmatch(entry)
        if match is None:
            if older.fullmatch(entry):
                aside.append(path)
            continue
        kind, host, pid = match.group(1), match.group(2), int(match.group(3))
        if not _gone(host, pid):
            continue
        if kind == "old":
            aside.append(path)
        elif os.path.isfile(os.path.join(path, _NEW_CONTENT)):
            shutil.rmtree(path, ignore_errors=True)
    if aside and not os.path.exists(target):
        os.replace(max(aside, key=os.path.getmtime), target)


def _owner() -> str:
    """This process, as the names of its hidden siblings hold it: host (letters, digits, ``_``) and pid."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname()) or '_'}.{os.getpid()}"


def _marker_owner(path: str) -> tuple[str, int]:
    """The ``(host, pid)`` a new write's marker names (a marker it cannot read names nobody known to be gone)."""
    try:
        with open(path) as marker:
            host, _, pid = marker.read().partition(".")
        return host, int(pid)
    except (OSError, ValueError):
        return "", 0


def _gone(host: str, pid: int) -> bool:
    """Whether the process that named a sibling ``host.pid`` has ended (known only for this host's processes, and not
    on Windows, where ``os.kill`` cannot ask)."""
    if host != _owner().split(".")[0] or pid in (0, os.getpid()) or sys.platform == "win32":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (setting it races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
