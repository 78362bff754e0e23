"""The real engine: drives the official `voxcpm` package (VoxCPM 1.x and 2) behind the Engine seam.

`generate()` reproduces `voxcpm.VoxCPM.generate(text, prompt_wav_path, prompt_text,
[reference_wav_path], cfg_value, inference_timesteps, retry_badcase=False)` step for step (same
whitespace normalisation, no text normaliser, min_len 2, max_len 4096, `torch.manual_seed`), but
  * switches LoRA adapters per request through `lora_runtime` (no reload, any rank/targets),
  * caches the prompt-audio features by the sha256 of the audio file's bytes (in memory and, with
    `feature_cache_dir`, on disk as safetensors, so saved voices are encoded once per model),
  * reports every generated patch through a forward hook on `tts_model.stop_head`, which the
    official loop calls exactly once per patch; the callback may raise TaskCancelled to abort.

Everything but `info` is called from one worker thread; nothing here is locked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from ..domain import EngineInfo
from .base import AudioCallback, ChunkRequest, PatchCallback

OFFICIAL_MIN_LEN = 2
OFFICIAL_MAX_LEN = 4096
OFFICIAL_RATIO = 6.0  # retry_badcase_ratio_threshold: the per-call patch cap is tokens * 6 + 10
TINY_MODELS = {"tiny": "voxcpm", "tiny-v1": "voxcpm", "tiny-v2": "voxcpm2"}
_EWMA_WEIGHT = 0.3
FEATURE_FORMAT = "voxcpm_api-prompt-features/1"  # bump when the on-disk layout or its meaning changes
log = logging.getLogger("voxcpm_api.engine")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voxcpm_api"


@dataclass(frozen=True)
class EngineConfig:
    model: str  # "tiny" / "tiny-v2", a local model directory, or a Hugging Face repo id
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False  # the official optimize=True (torch.compile, CUDA only)
    cache_dir: Path = field(default_factory=_default_cache_dir)  # tiny checkpoints live here
    lora_cache_size: int = 8  # loaded adapters kept in memory
    prompt_cache_size: int = 32  # encoded reference audios kept in memory
    # encoded reference audios kept on disk across restarts: <dir>/<model fingerprint>/<sha256>.<mode>.safetensors
    feature_cache_dir: Path | None = None
    feature_cache_max_files: int = 2000  # per model; the least recently used files go first


class ModelUnavailable(errors.NotReady):
    """The model could not be found locally nor downloaded."""


class VoxCPMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._info: EngineInfo | None = None
        self._vox: Any = None  # voxcpm.VoxCPM
        self._tts: Any = None  # VoxCPMModel | VoxCPM2Model
        self._lora: Any = None  # lora_runtime.LoRARuntime
        self._model_dir: Path | None = None
        self._prompt_cache: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._prompt_lock = threading.Lock()  # the cache dict; encoding runs outside it (callers may be threads)
        self._ppt_ewma: float | None = None  # observed patches per target token
        self._ppt_prior = 2.0
        self._normalizer: Any = None  # voxcpm.utils.text_normalize.TextNormalizer, lazily
        # counters, for tests and metrics
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0  # reference audios actually encoded
        self.prompt_disk_hits = 0  # features loaded from feature_cache_dir instead of encoding
        self._feature_namespace: str | None = None  # what features depend on besides the audio (set by load)
        self.last_patch_count = 0
        self.last_generate_s = 0.0

    # ------------------------------------------------------------------ loading

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    def load(self) -> EngineInfo:
        if self._info is not None:
            return self._info
        os.environ.setdefault("TQDM_DISABLE", "1")
        _silence_official_progress_bars()
        model_dir, model_id = self._resolve_model_dir()
        try:
            import voxcpm

            from .lora_runtime import LoRARuntime

            device = None if self.config.device in ("", "auto") else self.config.device

            def official() -> Any:
                return voxcpm.VoxCPM(voxcpm_model_path=str(model_dir), enable_denoiser=False,
                                     optimize=self.config.compile, device=device)

            with _checkpoint_weights_only() as missing:
                vox = official()
            if missing:  # weights the checkpoint lacks keep their initial values: load again the official way
                log.warning("the checkpoint has no %d weights (%s...); loading again with the official "
                            "initialisation", len(missing), ", ".join(missing[:3]))
                del vox
                vox = official()
        except errors.VoxError:
            raise
        except Exception as exc:
            raise errors.EngineFailure(f"could not load the model from {model_dir}: {_short(exc)}") from exc
        tts = vox.tts_model
        architecture = _read_architecture(model_dir)
        decode_chunk = int(getattr(tts, "_decode_chunk_size", tts.chunk_size))
        sample_rate = int(tts.sample_rate)
        patch_duration = tts.patch_size * decode_chunk / sample_rate
        self._vox, self._tts, self._model_dir = vox, tts, model_dir
        self._feature_namespace = _feature_namespace(model_dir, architecture, tts)
        self._lora = LoRARuntime(tts, cache_size=self.config.lora_cache_size)
        # Prior for the EWMA: real VoxCPM speech runs at roughly 4 text tokens per second.
        self._ppt_prior = min(max(0.25 / patch_duration, 0.5), OFFICIAL_RATIO - 0.5)
        self._info = EngineInfo(
            model_id=model_id,
            architecture=architecture,
            sample_rate_hz=sample_rate,
            patch_duration_s=patch_duration,
            device=str(tts.device),
            needs_ref_text=architecture != "voxcpm2",
        )
        return self._info

    def _resolve_model_dir(self) -> tuple[Path, str]:
        name = self.config.model.strip()
        if name.lower() in TINY_MODELS:
            from .tiny import build_tiny_checkpoints

            target = Path(self.config.cache_dir) / "tiny"
            try:
                ckpts = build_tiny_checkpoints(target)
            except Exception as exc:
                raise errors.EngineFailure(
                    f"could not build the tiny checkpoints under {target}: {_short(exc)}") from exc
            return ckpts.models[TINY_MODELS[name.lower()]], name.lower()
        local = Path(name).expanduser()
        looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
        if looks_like_path and not local.is_dir():
            raise ModelUnavailable(
                f"Model directory '{name}' does not exist. Put the weights there (config.json, model.safetensors, "
                "audiovae.pth, tokenizer.json, tokenizer_config.json, special_tokens_map.json), pass a Hugging "
                "Face repo id such as openbmb/VoxCPM1.5, or use --model tiny for the random test model."
            )
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ModelUnavailable(
                    f"'{name}' is a directory but has no config.json; a VoxCPM model directory holds config.json, "
                    "model.safetensors (or pytorch_model.bin), audiovae.pth and the tokenizer files."
                )
            return local.resolve(), name
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=name)), name
        except Exception as exc:
            slug = name.replace("/", "__")
            raise ModelUnavailable(
                f"Could not download '{name}' from the Hugging Face Hub ({_short(exc)}). "
                f"Put the weights in a local directory (e.g. ./models/{slug or 'openbmb__VoxCPM1.5'} holding "
                "config.json, model.safetensors, audiovae.pth, tokenizer.json, tokenizer_config.json and "
                "special_tokens_map.json) and pass --model <that directory>."
            ) from exc

    def _require_loaded(self) -> Any:
        if self._tts is None:
            raise errors.NotReady("the model is not loaded yet")
        return self._tts

    # ------------------------------------------------------------------ queries

    def linear_shapes(self) -> Mapping[str, tuple[int, int]]:
        self._require_loaded()
        return self._lora.linear_shapes()

    def expected_patches(self, text: str) -> int:
        tts = self._require_loaded()
        tokens = len(tts.text_tokenizer(_normalize_text(text))) if text and text.strip() else 0
        cap = official_patch_cap(tokens)
        per_token = self._ppt_ewma if self._ppt_ewma is not None else self._ppt_prior
        estimate = int(round(per_token * tokens))
        return max(1, min(cap, max(OFFICIAL_MIN_LEN + 2, estimate)))

    def check_reference_audio(self, path: str) -> None:
        name = Path(path).name
        try:
            import soundfile as sf

            try:
                info = sf.info(path)
                frames = int(info.frames)
                if frames <= 0:
                    raise errors.BadAudio(f"reference audio '{name}' cannot be decoded: it is empty",
                                          field="ref_audio_path")
                with sf.SoundFile(path) as fh:  # make sure samples decode, not just the header
                    fh.read(frames=min(frames, 4096), dtype="float32")
                return
            except errors.BadAudio:
                raise
            except Exception:
                import warnings

                import librosa

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    samples, _ = librosa.load(path, sr=None, mono=True, duration=5.0)
                if samples.size == 0:
                    raise errors.BadAudio(
                        f"reference audio '{name}' cannot be decoded: it is empty", field="ref_audio_path"
                    ) from None
        except errors.BadAudio:
            raise
        except Exception as exc:
            raise errors.BadAudio(f"reference audio '{name}' cannot be decoded: {_short(exc)}",
                                  field="ref_audio_path") from exc

    # ------------------------------------------------------------------ generation

    def _prepare(self, request: ChunkRequest) -> tuple[Any, str, dict | None]:
        """Shared by generate() and generate_stream(): text as the official caller shapes it, the
        request's adapter made active, and the prompt cache for cloning."""
        tts = self._require_loaded()
        if not isinstance(request.text, str) or not request.text.strip():
            raise errors.InvalidInput("text must be a non-empty string", field="text")
        text = _normalize_text(request.text)
        if request.normalize:
            text = self._text_normalizer().normalize(text)
        try:
            self._lora.activate(request.adapter)  # AdapterMismatch leaves the model untouched
            prompt_cache = self._prompt_cache_for(request)
        except errors.VoxError:
            raise
        except Exception as exc:
            raise errors.EngineFailure(f"could not prepare the generation: {_short(exc)}") from exc
        return tts, text, prompt_cache

    def _observe(self, tts: Any, text: str, patches: int, started: float) -> None:
        """Learn patches per token (for expected_patches) from a finished generation."""
        self.last_patch_count = patches
        self.last_generate_s = time.perf_counter() - started
        tokens = len(tts.text_tokenizer(text))
        if tokens > 0 and patches > 0:
            observed = patches / tokens
            self._ppt_ewma = observed if self._ppt_ewma is None else (
                (1 - _EWMA_WEIGHT) * self._ppt_ewma + _EWMA_WEIGHT * observed
            )

    def generate(self, request: ChunkRequest, on_patch: PatchCallback) -> np.ndarray:
        import torch

        started = time.perf_counter()
        tts, text, prompt_cache = self._prepare(request)
        patches = 0

        def hook(_module: Any, _inputs: Any, _output: Any) -> None:
            # the official loop calls stop_head exactly once per generated patch
            nonlocal patches
            patches += 1
            on_patch()

        handle = tts.stop_head.register_forward_hook(hook)
        try:
            torch.manual_seed(request.seed)  # what the official VoxCPM.generate caller does
            wav, _tokens, _feats = tts.generate_with_prompt_cache(**_official_args(request, text, prompt_cache))
            audio = wav.squeeze(0).cpu().numpy()
        except errors.VoxError:  # TaskCancelled from on_patch, ...
            raise
        except Exception as exc:
            raise errors.EngineFailure(f"generation failed: {_short(exc)}") from exc
        finally:
            handle.remove()
        self._observe(tts, text, patches, started)
        return np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)

    def generate_stream(self, request: ChunkRequest, on_audio: AudioCallback) -> int:
        """Synthesize one chunk through the official streaming path, one decoded patch at a time.

        Same preparation and seeding as generate() (`torch.manual_seed(seed)` right before the call),
        then `generate_with_prompt_cache_streaming`, whose every yield is one new patch's audio:
        `patch_size * chunk_size` samples. The official code decodes each patch on its own (VoxCPM 1.x:
        the last few patches' latents, keeping the newest patch's samples; VoxCPM2: a stateful causal
        VAE decoder), so the stream is reproducible for a seed but is NOT sample-identical to
        generate()'s file, which decodes all latents in one VAE pass. Returns the patch count.
        `on_audio` may raise TaskCancelled; the official generator is then closed at once.
        """
        import torch

        started = time.perf_counter()
        tts, text, prompt_cache = self._prepare(request)
        patches = 0
        torch.manual_seed(request.seed)  # what the official VoxCPM.generate caller does
        stream = tts.generate_with_prompt_cache_streaming(**_official_args(request, text, prompt_cache))
        try:
            while True:
                try:
                    wav, _tokens, _feats = next(stream)
                except StopIteration:
                    break
                patches += 1
                on_audio(np.ascontiguousarray(wav.reshape(-1).float().numpy(), dtype=np.float32))
        except errors.VoxError:  # TaskCancelled from on_audio, ...
            raise
        except Exception as exc:
            raise errors.EngineFailure(f"generation failed: {_short(exc)}") from exc
        finally:
            stream.close()
        self._observe(tts, text, patches, started)
        return patches

    def _text_normalizer(self) -> Any:
        """The official TextNormalizer (wetext + inflect), built on first use like VoxCPM.generate does."""
        if self._normalizer is None:
            try:
                from voxcpm.utils.text_normalize import TextNormalizer
            except ImportError as exc:
                raise errors.InvalidInput(f"text normalisation is not installed on this server ({exc.name})",
                                          field="normalize") from exc
            self._normalizer = TextNormalizer()
        return self._normalizer

    def _prompt_cache_for(self, request: ChunkRequest) -> dict | None:
        """The official prompt cache for this request, with audio features reused by content hash."""
        path = request.ref_audio_path
        ref_text = request.ref_text if request.ref_text is not None and request.ref_text.strip() else None
        is_v2 = self._info is not None and self._info.architecture == "voxcpm2"
        if path is None:
            if ref_text is not None:
                raise errors.InvalidInput("ref_text was given without reference audio", field="ref_text")
            return None
        if not is_v2 and ref_text is None:
            raise errors.InvalidInput(
                "this model (VoxCPM 1.x) needs ref_text, the transcript of the reference audio, to clone a voice",
                field="ref_text",
            )
        mode = "v1-prompt" if not is_v2 else ("v2-ref+prompt" if ref_text is not None else "v2-ref")
        try:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise errors.BadAudio(
                f"reference audio '{Path(path).name}' cannot be decoded: {_short(exc)}", field="ref_audio_path"
            ) from exc
        key = (digest, mode)
        with self._prompt_lock:
            features = self._prompt_cache.get(key)
            if features is not None:
                self.prompt_cache_hits += 1
                self._prompt_cache.move_to_end(key)
        if features is None:
            features = self._load_features(digest, mode)
            encoded = features is None
            if encoded:
                features = self._encode_prompt(path, ref_text, mode)
                self._save_features(digest, mode, features)
            with self._prompt_lock:
                if encoded:
                    self.prompt_cache_misses += 1
                else:
                    self.prompt_disk_hits += 1
                self._prompt_cache[key] = features
                while len(self._prompt_cache) > max(1, self.config.prompt_cache_size):
                    self._prompt_cache.popitem(last=False)
        cache = dict(features)
        if ref_text is not None:
            cache["prompt_text"] = ref_text
        return cache

    def _encode_prompt(self, path: str, ref_text: str | None, mode: str) -> dict:
        tts = self._tts
        try:
            if mode == "v1-prompt":
                built = tts.build_prompt_cache(prompt_text=ref_text, prompt_wav_path=path)
            elif mode == "v2-ref+prompt":
                built = tts.build_prompt_cache(prompt_text=ref_text, prompt_wav_path=path, reference_wav_path=path)
            else:
                built = tts.build_prompt_cache(reference_wav_path=path)
        except Exception as exc:
            self.check_reference_audio(path)  # raises BadAudio when the file is the problem
            raise errors.EngineFailure(f"could not encode the reference audio: {_short(exc)}") from exc
        # keep only the audio features (+ mode); the prompt text is per request
        return {k: v for k, v in built.items() if k != "prompt_text"}

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        """Encode (or load from disk) the features for this reference now, as generate() would."""
        self._require_loaded()
        request = ChunkRequest(text="", adapter=None, cfg_scale=1.0, steps=1, seed=0,
                               ref_audio_path=ref_audio_path, ref_text=ref_text)
        try:
            self._prompt_cache_for(request)
        except errors.VoxError:
            raise
        except Exception as exc:
            raise errors.EngineFailure(f"could not prepare the reference audio: {_short(exc)}") from exc

    def _feature_path(self, digest: str, mode: str) -> Path | None:
        if self.config.feature_cache_dir is None or self._feature_namespace is None:
            return None
        return Path(self.config.feature_cache_dir) / self._feature_namespace / f"{digest}.{mode}.safetensors"

    def _load_features(self, digest: str, mode: str) -> dict | None:
        """Features saved by _save_features (any engine on this model); None when absent or unusable."""
        path = self._feature_path(digest, mode)
        if path is None or not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as fh:  # no pickle: safe to load
                meta = fh.metadata() or {}
                if (meta.get("format"), meta.get("sha256"), meta.get("mode")) != (FEATURE_FORMAT, digest, mode):
                    return None
                features: dict[str, Any] = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # corrupt or foreign file: encode again (and overwrite it)
            log.warning("ignoring unreadable prompt features %s: %s", path, _short(exc))
            return None
        features.update({k[4:]: v for k, v in meta.items() if k.startswith("str:")})
        with contextlib.suppress(OSError):
            os.utime(path)  # mtime = last use, for _prune_features
        return features

    def _save_features(self, digest: str, mode: str, features: dict) -> None:
        """Atomically write the features (CPU tensors + string fields); failures only cost a re-encode later."""
        path = self._feature_path(digest, mode)
        if path is None:
            return
        tensors: dict[str, Any] = {}
        meta = {"format": FEATURE_FORMAT, "sha256": digest, "mode": mode}
        for name, value in features.items():
            if isinstance(value, str):
                meta["str:" + name] = value
            elif hasattr(value, "detach"):
                tensors[name] = value.detach().to("cpu").contiguous()
            else:  # nothing else is expected from the official build_prompt_cache; keep it in memory only
                return
        try:
            from safetensors.torch import save

            from ..audio.encoders import write_atomic

            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, save(tensors, metadata=meta))
            self._prune_features(path.parent)
        except Exception as exc:
            log.warning("could not store prompt features under %s: %s", path.parent, _short(exc))

    def _prune_features(self, directory: Path) -> None:
        """Bound the disk cache (one-off uploads land here too): drop the least recently used files."""
        files = list(directory.glob("*.safetensors"))
        excess = len(files) - max(1, self.config.feature_cache_max_files)
        if excess <= 0:
            return

        def last_used(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0
        for old in sorted(files, key=last_used)[:excess]:
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ introspection (tests/metrics)

    @property
    def lora_runtime(self) -> Any:
        return self._lora

    @property
    def tts_model(self) -> Any:
        return self._tts

    @property
    def model_dir(self) -> Path | None:
        return self._model_dir


# ---------------------------------------------------------------------------------------------- #
# helpers
# ---------------------------------------------------------------------------------------------- #


def _official_args(request: ChunkRequest, text: str, prompt_cache: dict | None) -> dict[str, Any]:
    """What VoxCPM.generate(..., retry_badcase=False) passes on, for both official entry points."""
    return {"target_text": text, "prompt_cache": prompt_cache, "min_len": OFFICIAL_MIN_LEN,
            "max_len": OFFICIAL_MAX_LEN, "inference_timesteps": request.steps, "cfg_value": request.cfg_scale,
            "retry_badcase": False}


def official_patch_cap(tokens: int) -> int:
    """The official per-call cap on generated patches: min(int(tokens * 6 + 10), max_len)."""
    return min(int(tokens * OFFICIAL_RATIO + 10), OFFICIAL_MAX_LEN)


def _feature_namespace(model_dir: Path, architecture: str, tts: Any) -> str:
    """Fingerprint of what prompt features depend on besides the audio: the audio VAE file, the model
    config, the device type and VAE dtype, and the official package version. A different model gets a
    different folder, so its features are never mixed up with these."""
    digest = hashlib.sha256(f"{FEATURE_FORMAT}|{architecture}".encode())
    try:
        digest.update((model_dir / "config.json").read_bytes())
    except OSError:
        pass
    for name in ("audiovae.safetensors", "audiovae.pth"):
        try:
            stat = (model_dir / name).stat()
        except OSError:
            continue
        digest.update(f"|{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    try:
        from importlib.metadata import version

        official = version("voxcpm")
    except Exception:
        official = "unknown"
    device = getattr(getattr(tts, "device", None), "type", None) or str(getattr(tts, "device", "cpu")).split(":")[0]
    try:
        vae_dtype = str(next(tts.audio_vae.parameters()).dtype)
    except Exception:
        vae_dtype = "unknown"
    digest.update(f"|{official}|{device}|{vae_dtype}".encode())
    return digest.hexdigest()[:16]


def _normalize_text(text: str) -> str:
    # exactly what voxcpm.core.VoxCPM._generate does before generating
    text = text.replace("\n", " ")
    return re.sub(r"\s+", " ", text)


def _read_architecture(model_dir: Path) -> str:
    try:
        data = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return str(data.get("architecture", "voxcpm")).lower()
    except (OSError, ValueError):
        return "voxcpm"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# torch.nn.init functions the official modules (and nn.Linear/Embedding/Conv defaults) initialise with
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")
# The patch below is process-wide (torch.nn.init and Module.load_state_dict), its effect per thread: the
# functions act as usual except on a thread inside `_checkpoint_weights_only`, so another engine's
# thread building modules meanwhile (a tiny checkpoint, an adapter) still gets its random values.
_patch_lock = threading.Lock()
_patch_users = 0
_patch_saved: dict[str, Any] = {}
_loading = threading.local()  # .missing: the list of the thread's load, while inside the context


@contextlib.contextmanager
def _checkpoint_weights_only() -> Any:
    """While the official loader runs on this thread: torch.nn.init leaves tensors as they are, and the
    keys every `load_state_dict` call left missing are collected into the yielded list.

    The official `from_local` builds the whole model on the CPU with random initialisation, then
    overwrites every weight from the checkpoint (VoxCPM2: 2.3 B random draws thrown away; `uniform_`
    alone was 7 s of a VoxCPM1.5 start profiled on an H100 host). Skipping the draws changes nothing
    when the checkpoint holds every weight, which the collected keys show; the caller loads again the
    official way when it does not."""
    import torch

    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            _install_init_patch(torch)
        _patch_users += 1
    missing: list[str] = []
    _loading.missing = missing
    try:
        yield missing
    finally:
        del _loading.missing
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for name in _INIT_FUNCTIONS:
                    setattr(torch.nn.init, name, _patch_saved.pop(name))
                torch.nn.Module.load_state_dict = _patch_saved.pop("load_state_dict")  # type: ignore[method-assign]


def _install_init_patch(torch: Any) -> None:
    def skipped_while_loading(original: Any) -> Any:
        @functools.wraps(original)
        def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(_loading, "missing", None) is not None:
                return tensor
            return original(tensor, *args, **kwargs)
        return init

    for name in _INIT_FUNCTIONS:
        _patch_saved[name] = getattr(torch.nn.init, name)
        setattr(torch.nn.init, name, skipped_while_loading(_patch_saved[name]))
    original_load = _patch_saved["load_state_dict"] = torch.nn.Module.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(module: Any, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_load(module, state_dict, *args, **kwargs)
        missing = getattr(_loading, "missing", None)
        if missing is not None:
            missing.extend(result.missing_keys)
        return result

    torch.nn.Module.load_state_dict = load_state_dict


def _silence_official_progress_bars() -> None:
    """tqdm reads TQDM_* env vars only when it is first imported (torch imports it early), so the
    env default set in load() alone would not reach the official per-patch bars; when the env asks
    for silence, also hand the official model modules a tqdm with disable=True."""
    value = os.environ.get("TQDM_DISABLE", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return
    try:
        import tqdm as _tqdm
        import voxcpm.model.voxcpm as v1
        import voxcpm.model.voxcpm2 as v2
    except Exception:
        return
    quiet = functools.partial(_tqdm.tqdm, disable=True)
    for module in (v1, v2):
        if getattr(module, "tqdm", None) is not None and not isinstance(module.tqdm, functools.partial):
            module.tqdm = quiet
