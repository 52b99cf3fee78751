"""Record sizes and decode throughput per CPU core (docs/data.md's numbers).

    python benchmarks/data_decode.py [out=benchmarks/results/data-decode-<date>.json] [repeats=5]

Real photographs from ``skimage.data`` (8 colour images, 300 to 1411 pixels), each as shipped and
as an ImageNet-like JPEG (longer side 500, quality 90: ImageNet's typical size). For each
resolution: bytes per image of raw pixels, of a PNG of the ADM crop, and of the record prepare
writes (the smaller of that PNG and the source file). Then, on one thread of one process (one
core; per CPU-second of the thread, and per wall-clock second), records/s through
``records.decode_record`` (the work grain's workers do per image) at 256
and 512, for PNG records, source-JPEG records and the mix prepare wrote, and the cores that keep
an accelerator consuming ``consumer_img_per_sec`` (default: the H100's 166 img/s of the 256-pixel
U-ViT in benchmarks/results/) fed.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import platform
import sys
import time

import numpy as np
from PIL import Image
import PIL
import skimage.data

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core.data import preprocess, records  # noqa: E402  pylint: disable=wrong-import-position

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "rocket.jpg", "ihc.png")
# The ILSVRC2012 training archive: 147,897,477,120 bytes of JPEGs for 1,281,167 images.
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_MEAN_JPEG_BYTES = 147_897_477_120 / IMAGENET_TRAIN_IMAGES
H100_UVIT_256_IMG_PER_SEC = 165.7  # benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-27.json


def sources() -> dict[str, dict[str, bytes]]:
  """{'as shipped': {name: bytes}, 'imagenet-like jpeg': {name: bytes}}."""
  shipped, jpeg = {}, {}
  for name in PHOTOS:
    with open(os.path.join(os.path.dirname(skimage.data.__file__), name), "rb") as f:
      shipped[name] = f.read()
    with Image.open(io.BytesIO(shipped[name])) as img:
      img = img.convert("RGB")
      s = 500 / max(img.size)
      img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BICUBIC)
      with io.BytesIO() as b:
        img.save(b, "JPEG", quality=90)
        jpeg[name] = b.getvalue()
  return {"as shipped": shipped, "imagenet-like jpeg": jpeg}


def encoded(data: bytes, res: int, codec: str | None) -> bytes:
  """A record of ``data`` at ``res``: forced PNG, forced source, or prepare's choice (None)."""
  image = preprocess.load_image(data, res)
  if codec == "png":
    return records.encode_record(image, 0)
  if codec == "src":
    return records.encode_record({"shape": list(image.shape), "codec": "src", "data": data,
                                  "nbytes": len(data), "pixels": records.pixel_digest(image)}, 0)
  return records.encode_record(image, 0, source=data)


def decode_rate(recs: list[bytes], repeats: int) -> tuple[float, float]:
  """(records per CPU-second of this thread, records per wall-clock second), each the best of
  ``repeats`` passes. CPU time is what a core spends, so a loaded machine (other processes
  taking turns on the cores) inflates it far less than wall time."""
  cpu = wall = float("inf")
  for _ in range(repeats):
    t, c = time.perf_counter(), time.thread_time()
    for r in recs:
      records.decode_record(r)
    cpu, wall = min(cpu, time.thread_time() - c), min(wall, time.perf_counter() - t)
  return len(recs) / cpu, len(recs) / wall


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown"


def main(argv: list[str]) -> int:
  opts = dict(a.split("=", 1) for a in argv)
  date = datetime.date.today().isoformat()
  out = opts.get("out", os.path.join(os.path.dirname(__file__), "results",
                                     f"data-decode-{date}.json"))
  repeats = int(opts.get("repeats", 5))
  consumer = float(opts.get("consumer_img_per_sec", H100_UVIT_256_IMG_PER_SEC))
  src = sources()
  result = {"schema": "simple-diffusion/data-decode/1", "date": date, "cpu": cpu_model(),
            "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "pillow": PIL.__version__,
            "photos": list(PHOTOS), "sizes": {}, "decode": {}}
  for res in (64, 128, 256, 512):
    row = {"raw": res * res * 3}
    for kind, files in src.items():
      png = [len(encoded(d, res, "png")) for d in files.values()]
      rec = [len(encoded(d, res, None)) for d in files.values()]
      row[kind] = {"source": float(np.mean([len(d) for d in files.values()])),
                   "png_record": float(np.mean(png)), "record": float(np.mean(rec))}
    # ImageNet estimate: a record is at most the smaller of a PNG (the photographs' mean ratio)
    # and its source JPEG (ImageNet's mean), so the mean is at most the smaller of the means.
    est = min(row["as shipped"]["png_record"], IMAGENET_MEAN_JPEG_BYTES)
    row["imagenet_estimate_bytes_per_image"] = est
    row["imagenet_train_estimate_bytes"] = est * IMAGENET_TRAIN_IMAGES
    result["sizes"][res] = row
    print(f"res {res}: " + json.dumps(row))
  for res in (256, 512):
    jpegs = list(src["imagenet-like jpeg"].values())
    sets = {"png": [encoded(d, res, "png") for d in src["as shipped"].values()],
            "src (imagenet-like jpeg)": [encoded(d, res, "src") for d in jpegs],
            "as prepared (imagenet-like jpeg)": [encoded(d, res, None) for d in jpegs]}
    row = {}
    for name, recs in sets.items():
      rate, wall = decode_rate(recs, repeats)
      row[name] = {"img_per_sec_per_core": rate, "img_per_wall_sec": wall,
                   "cores_for_consumer": consumer / rate}
    result["decode"][res] = row
    print(f"decode at {res}: " + json.dumps(row))
  result["consumer_img_per_sec"] = consumer
  result["loadavg_after"] = os.getloadavg()
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
