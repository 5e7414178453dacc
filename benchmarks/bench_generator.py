"""Generator-stage throughput: chatroom's DiffusersGenerator vs diffusers directly.

Both sides use the same smoke models, prompts, seeds, sampler and size on the CPU;
the direct side calls ``StableDiffusionPipeline`` with plain prompts (no WebUI
emphasis, chunking or NaN guard), so the difference is chatroom's overhead.

    python benchmarks/bench_generator.py [--models DIR] [--images 8] [--rounds 3]

Both sides are loaded once and run image by image in turn; each round's time is
summed per side and the median round is reported. ``chatroom_relative_throughput``
is chatroom's images per second over diffusers' (1.0: no overhead). Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
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


def direct_side(model: str, args):
    """diffusers called directly: ``run(prompt, seed)`` makes one image."""
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

    def run(prompt: str, seed: int) -> None:
        pipe(
            prompt,
            negative_prompt="lowres",
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        )

    return run


def chatroom_side(model: str, args, generator_cls=None):
    """chatroom's generator: ``run(prompt, seed)`` makes one image."""
    from chatroom.components import Context, validate_options
    from chatroom.models import PromptSpec

    if generator_cls is None:
        from chatroom.plugins.diffusers_generator import DiffusersGenerator

        generator_cls = DiffusersGenerator
    raw = {
        "model": model,
        "steps": args.steps,
        "cfg_scale": 4.0,
        "width": args.width,
        "height": args.height,
        "device": "cpu",
        "dtype": "float32",
    }
    options = validate_options(generator_cls, "generator", raw)
    generator = generator_cls(options, Context(domain=None))
    counter = iter(range(1 << 30))

    def run(prompt: str, seed: int) -> None:
        index = next(counter)
        spec = PromptSpec(
            index=index, item_id=f"i{index}", prompt=prompt, negative_prompt="lowres"
        )
        generator.generate([spec], [seed])

    return run


def measure(sides: dict, prompts, seeds, rounds: int) -> dict[str, dict]:
    """Wall and CPU seconds per round for each side, interleaved image by image.

    Interleaving puts both sides under the same background load, which on a shared
    machine moves far more than either side's overhead; CPU time (this process's,
    all threads) moves less with the load than wall time does.
    """
    names = list(sides)
    for name in names:  # warm up: first calls allocate and pick kernels
        for prompt, seed in zip(prompts[:2], seeds[:2], strict=True):
            sides[name](f"warm-up, {prompt}", seed)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for round_ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            order = names if (i + round_) % 2 == 0 else names[::-1]
            # A new prompt every round, so that no side meets a prompt twice.
            text = f"{prompt}, take {round_}"
            for name in order:
                started, cpu_started = time.perf_counter(), time.process_time()
                sides[name](text, seed)
                spent[name] += time.perf_counter() - started
                cpu[name] += time.process_time() - cpu_started
        for name in names:
            times[name]["wall"].append(spent[name])
            times[name]["cpu"].append(cpu[name])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="a smoke-models folder (written if absent)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
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
    # Every prompt is new, as in a run; the negative prompt is the same throughout.
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}, photo {i}" for i in range(args.images)]
    seeds = list(range(1, args.images + 1))

    sides = {
        "diffusers": direct_side(model, args),
        "chatroom": chatroom_side(model, args),
    }
    times = measure(sides, prompts, seeds, args.rounds)
    median = {name: statistics.median(t["wall"]) for name, t in times.items()}
    cpu = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    result = {
        "images": args.images,
        "rounds": args.rounds,
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "seconds_per_image": {k: round(v / args.images, 4) for k, v in median.items()},
        "images_per_second": {k: round(args.images / v, 2) for k, v in median.items()},
        "chatroom_relative_throughput": round(
            median["diffusers"] / median["chatroom"], 4
        ),
        "cpu_seconds_per_image": {k: round(v / args.images, 4) for k, v in cpu.items()},
        "chatroom_relative_cpu_throughput": round(
            cpu["diffusers"] / cpu["chatroom"], 4
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
