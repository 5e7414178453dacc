"""Generator-stage throughput: chatroom's DiffusersGenerator vs diffusers directly.

Both sides use the same smoke models, prompts, seeds, sampler and size on the CPU;
the direct side calls ``StableDiffusionPipeline`` with plain prompts (no WebUI
emphasis, chunking or NaN guard), so the difference is chatroom's overhead.

    python benchmarks/bench_generator.py [--models DIR] [--images 8] [--hires]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_generator")

PROMPTS = [
    "a woman in a red dress, long sleeves, studio photo",
    "a man in a grey coat and white sneakers, street style",
    "a girl in a denim jacket and jeans, plain background",
    "a person in a black leather jacket, full body, looking at camera",
]


def direct(model: str, prompts, seeds, args) -> float:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, local_files_only=True
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config,
        algorithm_type="sde-dpmsolver++",
        use_karras_sigmas=True,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(prompts[0], width=args.width, height=args.height, num_inference_steps=1)
    started = time.perf_counter()
    for prompt, seed in zip(prompts, seeds, strict=True):
        pipe(
            prompt,
            negative_prompt="lowres",
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
    return time.perf_counter() - started


def through_chatroom(model: str, prompts, seeds, args) -> float:
    from chatroom.components import Context, validate_options
    from chatroom.models import PromptSpec
    from chatroom.plugins.diffusers_generator import DiffusersGenerator

    raw = {
        "model": model,
        "steps": args.steps,
        "cfg_scale": 4.0,
        "width": args.width,
        "height": args.height,
        "device": "cpu",
        "dtype": "float32",
    }
    options = validate_options(DiffusersGenerator, "generator", raw)
    generator = DiffusersGenerator(options, Context(domain=None))
    warm = PromptSpec(index=0, item_id="w", prompt=prompts[0], negative_prompt="")
    generator.generate([warm], [0])
    specs = [
        PromptSpec(index=i, item_id=f"i{i}", prompt=p, negative_prompt="lowres")
        for i, p in enumerate(prompts)
    ]
    started = time.perf_counter()
    for spec, seed in zip(specs, seeds, strict=True):
        generator.generate([spec], [seed])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="a smoke-models folder (written if absent)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from chatroom.smoke import write_smoke_models

    folder = Path(args.models or tempfile.mkdtemp(prefix="chatroom-bench-"))
    if not (folder / "sd15" / "model_index.json").is_file():
        write_smoke_models(folder)
    model = str(folder / "sd15")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    seeds = list(range(1, args.images + 1))

    # Alternate the order so neither side always runs on a warmer machine.
    times = {"diffusers": [], "chatroom": []}
    for round_ in range(2):
        sides = [("diffusers", direct), ("chatroom", through_chatroom)]
        for name, run in sides if round_ == 0 else sides[::-1]:
            times[name].append(run(model, prompts, seeds, args))
    best = {name: min(values) for name, values in times.items()}
    result = {
        "images": args.images,
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_image": {k: round(v / args.images, 4) for k, v in best.items()},
        "images_per_second": {k: round(args.images / v, 2) for k, v in best.items()},
        "chatroom_overhead": round(best["chatroom"] / best["diffusers"] - 1, 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
