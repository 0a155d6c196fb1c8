"""Caption image pairs with Qwen2-VL / Qwen2.5-VL through transformers (optional dependencies).

    python scripts/caption_vlm.py ROOT --out DIR --model /path/to/Qwen2-VL-7B-Instruct

Needs torch and transformers with Qwen2-VL (`pip install 'dtpf-jax[vlm]'`) and the model
weights; a GPU with about 20 GB for the 7B model in bf16. Writes one caption file per pair,
`DIR/<split>/<A file>_<B file>.txt`, in the official two-line record format (blank lines and
markdown removed), the layout `python -m dtpf_jax.text embed ROOT --captions DIR` reads. Without
a VLM, `python -m dtpf_jax.text caption ROOT --out DIR` measures the degradations instead.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable, Sequence

from PIL import Image

from dtpf_jax import captions, datasets
from dtpf_jax.images import read_image, refuse_shared

IVF_EVENTS = ("Low Light", "Over Exposure", "IR Low Contrast", "High Noise", "IR Noise",
              "Motion Blur", "Sensor Artifact")  # fmt: skip
MED_EVENTS = ("Contrast Enhancement", "Edge Preservation", "Noise Suppression",
              "Detail Enhancement", "Structure Consistency", "Artifact Reduction")  # fmt: skip

_SYSTEM = """You inspect a pair of registered images that an image-fusion network will merge.
{subject}
Report each problem you can see as a record of exactly two lines:
Event Type: <name>
Description: <one sentence on where and how strongly it appears>
Prefer these names: {events}. Use another short name only when none of them fits, and write
one record "Event Type: Normal" when the pair has no visible problem. Write at most four
records, most important first, with no blank lines, numbering, markdown or other text."""
_SUBJECT = {
    "ivf": "The first image is a visible-light photograph, the second an infrared (thermal) "
    "image of the same scene. Look for poor lighting, clipped highlights, weak thermal "
    "contrast, noise in either image, blur and stripe or pattern artifacts of the sensor.",
    "medical": "The first image is a CT, PET or SPECT slice, the second the MRI slice of the "
    "same anatomy. Name what the fused image most needs: more contrast, sharper edges, less "
    "noise, finer detail, consistent structures or fewer artifacts.",
}
USER_TEXT = {
    "ivf": "Describe the problems of this image pair: first visible, second infrared.",
    "medical": "Describe what fusing this pair needs: first CT, PET or SPECT, second MRI.",
}


def system_prompt(kind: str) -> str:
    """The system message for an 'ivf' or 'medical' pair."""
    events = IVF_EVENTS if kind == "ivf" else MED_EVENTS
    return _SYSTEM.format(subject=_SUBJECT[kind], events=", ".join(events))


def build_messages(kind: str) -> list[dict]:
    """Chat messages (Qwen2-VL format); the two images are passed to the processor in order."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt(kind)}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": USER_TEXT[kind]},
            ],
        },
    ]


def clean_caption(reply: str, kind: str) -> str:
    """The model's reply as canonical two-line records ('' when it holds no record)."""
    records = captions.parse_caption(reply, kind)
    return "".join(f"Event Type: {r.event}\nDescription: {r.description}\n" for r in records)


class QwenCaptioner:
    """Callable (messages, images) -> reply text, backed by a local Qwen2-VL checkpoint."""

    def __init__(self, model: str, max_new_tokens: int = 128):
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as e:
            raise SystemExit(
                f"caption_vlm needs torch and transformers with Qwen2-VL ({e}); install them with "
                "`pip install 'dtpf-jax[vlm]'`, or caption without a VLM: "
                "`python -m dtpf_jax.text caption ROOT --out DIR`"
            ) from None
        self.torch, self.max_new_tokens = torch, max_new_tokens
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, torch_dtype=torch.bfloat16, device_map="auto"
            )
        except OSError as e:
            raise SystemExit(
                f"cannot load {model!r} ({e}); pass --model /path/to/Qwen2-VL"
            ) from None

    def __call__(self, messages: list[dict], images: Sequence[Image.Image]) -> str:
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=list(images), return_tensors="pt")
        inputs = inputs.to(self.model.device)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0]


def caption_tree(
    root: str | pathlib.Path,
    out: str | pathlib.Path,
    captioner: Callable[[list[dict], Sequence[Image.Image]], str],
) -> dict[str, int]:
    """Caption every pair under `root` into out/<split>/; number of empty replies per split."""
    root, out = pathlib.Path(root), pathlib.Path(out)
    refuse_shared(out)
    empty = {}
    for split in datasets.find_splits(root):
        rel = datasets.relative_split(split, root)
        (out / rel).mkdir(parents=True, exist_ok=True)
        empty[rel] = 0
        for p in datasets.split_pairs(split, root):
            images = [Image.fromarray(read_image(p.a, "RGB")),
                      Image.fromarray(read_image(p.b, "L")).convert("RGB")]  # fmt: skip
            caption = clean_caption(captioner(build_messages(split.kind), images), split.kind)
            empty[rel] += not caption
            name = f"{pathlib.Path(p.a).name}_{pathlib.Path(p.b).name}.txt"
            (out / rel / name).write_text(caption, encoding="utf-8")
    return empty


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="dataset folder (a split or a tree of splits)")
    parser.add_argument("--out", required=True, help="caption tree to write (mirrors ROOT)")
    parser.add_argument("--model", required=True, help="local Qwen2-VL / Qwen2.5-VL folder")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    captioner = QwenCaptioner(args.model, args.max_new_tokens)
    for rel, n in caption_tree(args.root, args.out, captioner).items():
        print(f"{rel}: done" + (f", {n} replies without a record (empty files)" if n else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
