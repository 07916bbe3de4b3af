"""lorakit's demo world: a tiny SD1.x-family model pretrained on procedurally drawn animals.

`lorakit.demo.world` draws the world and the instance character (the "usu bear"),
`lorakit.demo.metric` tells what a (generated) picture shows without any network access,
and `DEMO_MODEL` is the shipped base model (an LDM single file, load it with load_base_model).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "lorakit-demo-sd1.safetensors"
METRIC_WEIGHTS = ASSETS / "metric.safetensors"


def load_demo_model(dtype=None):
    """The shipped demo base model as a lorakit BaseModel (fp32 unless `dtype`)."""
    import torch

    from lorakit.models.loader import load_base_model

    return load_base_model(DEMO_MODEL, dtype=dtype or torch.float32)


def diffusers_pipeline(base, scheduler: str = "ddim"):
    """A diffusers StableDiffusionPipeline over a BaseModel, with kohya's noise schedule (for tests/tools)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if scheduler == "ddim":
        sched = DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    else:
        sched = EulerDiscreteScheduler(**kw, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(
    pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance_scale: float = 6.0, batch: int = 32
):
    """One 64x64 PIL image per (prompt, seed), each seed its own generator (reproducible in any batch)."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        gens = [torch.Generator().manual_seed(s) for s in ss]
        with torch.no_grad():
            out += pipe(
                ps,
                height=64,
                width=64,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gens,
            ).images
    return out
