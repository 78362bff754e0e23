"""How a user calls the official package for one ChunkRequest: shared by the parity tests."""

from __future__ import annotations

import numpy as np
import torch

from voxcpm_api.engine.base import ChunkRequest


def official_generate(vox, arch: str, req: ChunkRequest) -> np.ndarray:
    """`torch.manual_seed(seed)` then `VoxCPM.generate(...)`, with the clone arguments each model takes."""
    kwargs: dict = {"text": req.text, "cfg_value": req.cfg_scale, "inference_timesteps": req.steps,
                    "retry_badcase": False, "normalize": req.normalize}
    if req.ref_audio_path is not None:
        if arch == "voxcpm":
            kwargs.update(prompt_wav_path=req.ref_audio_path, prompt_text=req.ref_text)
        elif req.ref_text:
            kwargs.update(prompt_wav_path=req.ref_audio_path, prompt_text=req.ref_text,
                          reference_wav_path=req.ref_audio_path)
        else:
            kwargs.update(reference_wav_path=req.ref_audio_path)
    torch.manual_seed(req.seed)
    return vox.generate(**kwargs)
