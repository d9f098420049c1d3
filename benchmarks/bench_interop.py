"""An imported InternVL in tinyomni next to transformers: load time, peak memory, vision encode, and
image-to-first-token, on a random-weight model of InternVL2.5-1B's real shape, in one run.

    python benchmarks/bench_interop.py            # fp32 and bf16, 2 timed repeats each (~6 min on 2 cores)
    python benchmarks/bench_interop.py --quick    # 1 timed repeat
    python benchmarks/bench_interop.py --dir /tmp/internvl-1b-shape   # keep (or reuse) the built model
    python benchmarks/bench_interop.py --load-only --repeats 3        # load time and memory only (~2 min)

The model is built with transformers from InternVL2.5-1B's published config numbers, with nothing
downloaded: InternViT-300M (24 layers, 1024 wide, 16 heads, 448 px tiles, patch 14, layer scale),
pixel shuffle 0.5 (256 tokens a tile), the MLP projector, and a Qwen2.5-0.5B decoder (24 layers,
hidden 896, 14 heads over 2 KV heads, intermediate 4864, vocab 151674, untied head). The weights are
random and saved once, in bfloat16, as transformers' "-hf" InternVL directory; the tokenizer is a small
BPE trained here (its ids sit inside the real vocabulary), so prompts are a few dozen tokens either way.

Each (engine, dtype) runs in a fresh process, one after another:
- load: from the directory to a model ready to run (tinyomni.load with its load cache off, i.e. the
  import itself; transformers' from_pretrained + tokenizer + image processor);
- peak RSS: the process's peak resident memory after loading (VmHWM), and after the timed runs; and
  "peak / weights": what loading added to the process (peak after load minus the resident memory just
  before it) over the bytes of the loaded parameters (the issue's bound: about 1.3 at most);
- vision encode: one 448-px tile through the vision tower and projector (tinyomni
  `OmniModel.encode_images`, transformers `get_image_features`); for a float32 tinyomni model also with
  bfloat16 encoders in front of it (`encoder_dtype`, `Model.cast_encoders`);
- image→first token: a one-tile 448×448 image and a short question, from the PIL image to the first
  generated token (preprocessing, vision, prefill, one token; tinyomni `Model.complete(...,
  max_new_tokens=1)`, transformers processor + `generate(max_new_tokens=1)`).
Times are medians of the repeats after one warm-up. Ratios are transformers / tinyomni (above 1:
tinyomni is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TILE = 448
QUESTION = "What is in the picture? Describe it in one sentence."
CORPUS = ["What is in the picture? Describe it in one sentence.", "The quick brown fox jumps over the lazy dog.",
          "A photo of a cat sitting on a red chair next to a window.", "user assistant system 0 1 2 3 4 5 6 7 8 9"] * 4
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --- the model ---------------------------------------------------------------------------------------
def build(path: Path) -> None:
    """A random InternVL2.5-1B-shaped "-hf" directory at `path`, weights in bfloat16."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=IMAGE_TOKENS)
    text = transformers.Qwen2Config(
        vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    vision = transformers.InternVLVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=TILE,
        patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", use_mean_pooling=True,
        layer_scale_init_value=0.1)
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.InternVLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    image_processor(transformers).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": 256, "processor_class": "InternVLProcessor"}, indent=2))


def image_processor(transformers: Any) -> Any:
    """InternVL's processor settings, capped at one tile (the benchmark times a single 448-px tile)."""
    return transformers.GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        crop_to_patches=True, min_patches=1, max_patches=1)


def test_image() -> Any:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (TILE, TILE, 3), generator=g, dtype=torch.uint8).numpy())


# --- one engine, one dtype, in a fresh process -------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent across fork + exec, so a worker would report the parent's peak (the built model) instead."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mb() -> float:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(engine: str, dtype_name: str, path: Path, repeats: int, load_only: bool = False) -> dict[str, float]:
    dtype = DTYPES[dtype_name]
    image = test_image()
    pixels = torch.randn(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.set_grad_enabled(False)
    if engine == "tinyomni":
        os.environ["TINYOMNI_CACHE"] = "off"  # the import itself, not a cache read
        os.environ["TINYOMNI_MEDIA_CACHE_MB"] = "0"  # every repeat encodes its image, as transformers does
        import tinyomni

        rss_before = rss_mb()
        start = time.perf_counter()
        model = tinyomni.load(path, dtype=dtype)
        load_s = time.perf_counter() - start
        rss_load = peak_rss_mb()
        weights_mb = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2**20
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": QUESTION}]}]

        def encode() -> None:
            model.model.encode_images(pixels)

        def first_token() -> None:
            done = model.complete(messages, max_tiles=1, max_new_tokens=1, ignore_eos=True)
            assert done.completion_tokens == 1

        prompt_tokens = len(model.prepare(messages, max_tiles=1).input_ids)
    else:
        import transformers
        from transformers.processing_utils import ProcessorMixin

        rss_before = rss_mb()
        start = time.perf_counter()
        model = transformers.InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        images = transformers.AutoImageProcessor.from_pretrained(path)
        load_s = time.perf_counter() - start
        rss_load = peak_rss_mb()
        weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        # AutoProcessor would also build InternVL's video processor, which needs torchvision: the class
        # check is skipped for that absent argument only (as tests/test_interop_internvl.py does).
        original = ProcessorMixin.check_argument_for_proper_class
        ProcessorMixin.check_argument_for_proper_class = (
            lambda self, name, arg: None if arg is None else original(self, name, arg))
        processor = transformers.InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                                   chat_template=TEMPLATE, image_seq_length=256)
        ProcessorMixin.check_argument_for_proper_class = original
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)

        def encode() -> None:
            model.get_image_features(pixel_values=pixels)

        def first_token() -> None:
            inputs = processor(images=[image], text=[text], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 1

        prompt_tokens = processor(images=[image], text=[text], return_tensors="pt")["input_ids"].shape[1]
    loading = {"load_s": load_s, "rss_load_mb": rss_load, "load_over_weights": (rss_load - rss_before) / weights_mb,
               "prompt_tokens": prompt_tokens, "threads": torch.get_num_threads()}
    if load_only:
        return loading
    result = {**loading, "encode_s": timed(encode, repeats), "first_token_s": timed(first_token, repeats)}
    if engine == "tinyomni" and dtype != torch.bfloat16:  # the same decoder, bf16 towers (encoder_dtype)
        model.cast_encoders(torch.bfloat16)
        result["encode_bf16_encoders_s"] = timed(encode, repeats)
    return {**result, "rss_peak_mb": peak_rss_mb()}


def run_worker(engine: str, dtype: str, path: Path, repeats: int, load_only: bool = False) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", engine, "--dtype", dtype, "--dir", str(path),
           "--repeats", str(repeats)] + (["--load-only"] if load_only else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine} {dtype} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed repeat instead of 2")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--dir", type=Path, default=None, help="where the model is built (reused if there)")
    parser.add_argument("--load-only", action="store_true",
                        help="measure loading only: each (engine, dtype) loaded --repeats times, fresh processes "
                             "taking turns, medians reported")
    parser.add_argument("--worker", choices=["tinyomni", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.dir, repeats, args.load_only)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-interop-") as tmp:
        path = args.dir or Path(tmp) / "internvl2_5-1b-shape"
        if not (path / "config.json").is_file():
            start = time.perf_counter()
            build(path)
            size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
            console.print(f"built {path} ({size:.2f} GB bf16) in {time.perf_counter() - start:.0f} s")
        if args.load_only:  # a load is one process: repeat whole processes, taking turns, keep medians
            runs: dict[tuple[str, str], list[dict[str, float]]] = {}
            for _ in range(repeats):
                for dtype in args.dtypes:
                    for engine in ("transformers", "tinyomni"):
                        runs.setdefault((engine, dtype), []).append(run_worker(engine, dtype, path, 1, True))
            results = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
        else:
            results = {(engine, dtype): run_worker(engine, dtype, path, repeats)
                       for dtype in args.dtypes for engine in ("transformers", "tinyomni")}

    any_result = next(iter(results.values()))
    table = Table(title=f"InternVL2.5-1B shape (random weights), one 448-px tile, prompt "
                        f"{any_result['prompt_tokens']} tokens; median of {repeats}, "
                        f"{any_result['threads']} threads; × = transformers / tinyomni")
    for column in ("dtype", "measure", "transformers", "tinyomni", "×"):
        table.add_column(column, justify="left" if column in ("dtype", "measure") else "right")
    measures = [("load (s)", "load_s", "{:.2f}"), ("peak RSS after load (MB)", "rss_load_mb", "{:.0f}"),
                ("load's peak / weights", "load_over_weights", "{:.2f}"),
                ("peak RSS after the runs (MB)", "rss_peak_mb", "{:.0f}"),
                ("vision encode, 1 tile (s)", "encode_s", "{:.3f}"),
                ("image → first token (s)", "first_token_s", "{:.3f}")]
    measures = [m for m in measures if m[1] in any_result]
    for dtype in args.dtypes:
        hf, ours = results[("transformers", dtype)], results[("tinyomni", dtype)]
        for label, key, fmt in measures:
            table.add_row(dtype, label, fmt.format(hf[key]), fmt.format(ours[key]), f"{hf[key] / ours[key]:.2f}")
        if "encode_bf16_encoders_s" in ours:  # against transformers' encode in this dtype
            key = "encode_bf16_encoders_s"
            table.add_row(dtype, "vision encode, encoder_dtype=bfloat16 (s)", f"{hf['encode_s']:.3f}",
                          f"{ours[key]:.3f}", f"{hf['encode_s'] / ours[key]:.2f}")
    console.print(table)
    console.print(json.dumps({f"{e}/{d}": r for (e, d), r in results.items()}))


if __name__ == "__main__":
    main()
