"""Writes the sample datasets `data/t2i/` and `data/i2i/` (64x64 PNGs drawn with PIL and the DejaVu fonts).

    python data/make_samples.py            # from the repository root; re-running gives identical bytes

Each image is a small scene (background, shapes, quoted text) drawn at 4x and downsampled with a Lanczos filter
for smooth edges. I2I examples are a source scene and the same scene with the prompt's edit applied.
"""

from __future__ import annotations

import os
import sys

from PIL import Image, ImageDraw, ImageFont

SIZE = 64                 # the embedded tiny model generates 64x64
SCALE = 4                 # supersampling factor
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
HERE = os.path.dirname(os.path.abspath(__file__))

COLORS = {
    "red": (220, 30, 40), "green": (40, 170, 60), "blue": (30, 70, 210), "yellow": (245, 210, 30),
    "black": (15, 15, 15), "white": (245, 245, 245), "purple": (130, 50, 170), "orange": (245, 130, 20),
    "gray": (128, 128, 128), "pink": (240, 130, 180), "dark green": (20, 80, 40), "brown": (120, 70, 30),
}

# A scene is a background colour name and a list of shapes, in 64-pixel coordinates:
#   ("circle", colour, cx, cy, r) | ("rect", colour, x0, y0, x1, y1) | ("tri", colour, x0, y0, x1, y1)
#   ("ellipse", colour, x0, y0, x1, y1) | ("star", colour, cx, cy, r) | ("cross", colour, cx, cy, r)
#   ("text", colour, string, cx, cy, max_width, max_height)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(os.path.join(FONT_DIR, "DejaVuSans-Bold.ttf"), size)


def _fit_font(text: str, max_w: float, max_h: float) -> ImageFont.FreeTypeFont:
    """The largest bold font whose rendering of `text` fits (max_w, max_h) at the supersampled scale."""
    size = int(max_h * SCALE)
    while size > 4:
        f = _font(size)
        x0, y0, x1, y1 = f.getbbox(text)
        if x1 - x0 <= max_w * SCALE and y1 - y0 <= max_h * SCALE:
            return f
        size -= 1
    return _font(size)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rr = r if k % 2 == 0 else r * 0.42
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def render(scene: tuple[str, list[tuple]]) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    bg, shapes = scene
    s = SCALE
    im = Image.new("RGB", (SIZE * s, SIZE * s), COLORS[bg])
    d = ImageDraw.Draw(im)
    for kind, colour, *a in shapes:
        c = COLORS[colour]
        if kind == "circle":
            cx, cy, r = a
            d.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=c)
        elif kind == "rect":
            d.rectangle([a[0] * s, a[1] * s, a[2] * s - 1, a[3] * s - 1], fill=c)
        elif kind == "ellipse":
            d.ellipse([a[0] * s, a[1] * s, a[2] * s - 1, a[3] * s - 1], fill=c)
        elif kind == "tri":
            x0, y0, x1, y1 = (v * s for v in a)
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=c)
        elif kind == "star":
            d.polygon([(x * s, y * s) for x, y in _star(*a)], fill=c)
        elif kind == "cross":
            cx, cy, r = a
            w = r / 3
            d.rectangle([(cx - w) * s, (cy - r) * s, (cx + w) * s, (cy + r) * s], fill=c)
            d.rectangle([(cx - r) * s, (cy - w) * s, (cx + r) * s, (cy + w) * s], fill=c)
        elif kind == "text":
            text, cx, cy, mw, mh = a
            d.text((cx * s, cy * s), text, fill=c, font=_fit_font(text, mw, mh), anchor="mm")
        else:
            raise ValueError(f"unknown shape {kind!r}")
    return im.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _sign(text: str, fg: str, plate: str, bg: str) -> tuple[str, list[tuple]]:
    return bg, [("rect", plate, 4, 16, 60, 48), ("text", fg, text, 32, 32, 50, 22)]


T2I_TRAIN = [
    ("a red circle on a blue background", ("blue", [("circle", "red", 32, 32, 18)])),
    ("a yellow square on a black background", ("black", [("rect", "yellow", 16, 16, 48, 48)])),
    ("a green triangle on a white background", ("white", [("tri", "green", 12, 14, 52, 50)])),
    ('a sign that says "OPEN"', _sign("OPEN", "white", "blue", "gray")),
    ("two blue circles on a yellow background",
     ("yellow", [("circle", "blue", 20, 32, 11), ("circle", "blue", 44, 32, 11)])),
    ("a white star on a purple background", ("purple", [("star", "white", 32, 34, 22)])),
    ('a red stop sign that says "STOP"', _sign("STOP", "white", "red", "white")),
    ("an orange circle above a gray square",
     ("white", [("circle", "orange", 32, 18, 11), ("rect", "gray", 20, 34, 44, 58)])),
    ("a black cross on a white background", ("white", [("cross", "black", 32, 32, 20)])),
    ('the word "SALE" in red letters on a white background',
     ("white", [("text", "red", "SALE", 32, 32, 56, 24)])),
    ("a pink ellipse on a dark green background", ("dark green", [("ellipse", "pink", 8, 20, 56, 44)])),
    ("a blue square on the left and a red circle on the right",
     ("white", [("rect", "blue", 6, 22, 26, 42), ("circle", "red", 46, 32, 11)])),
    ('a green sign that says "EXIT"', _sign("EXIT", "white", "green", "black")),
    ("a yellow sun above blue water",
     ("white", [("rect", "blue", 0, 40, 64, 64), ("circle", "yellow", 32, 20, 12)])),
    ("a brown square on an orange background", ("orange", [("rect", "brown", 14, 14, 50, 50)])),
    ('a black sign with yellow text that says "GO"', _sign("GO", "yellow", "black", "white")),
]

T2I_EVAL = [
    ("a green circle on a red background", ("red", [("circle", "green", 32, 32, 18)])),
    ('a sign that says "CAFE"', _sign("CAFE", "white", "brown", "gray")),
    ("a white triangle on a black background", ("black", [("tri", "white", 12, 14, 52, 50)])),
    ("a red square on a yellow background", ("yellow", [("rect", "red", 16, 16, 48, 48)])),
]

I2I_TRAIN = [
    ("make the circle green",
     ("blue", [("circle", "red", 32, 32, 18)]), ("blue", [("circle", "green", 32, 32, 18)])),
    ("make the background white",
     ("black", [("rect", "yellow", 16, 16, 48, 48)]), ("white", [("rect", "yellow", 16, 16, 48, 48)])),
    ('add the text "SALE"',
     ("white", [("circle", "blue", 32, 20, 12)]),
     ("white", [("circle", "blue", 32, 20, 12), ("text", "red", "SALE", 32, 48, 48, 16)])),
    ("remove the square",
     ("white", [("circle", "red", 20, 32, 11), ("rect", "green", 36, 22, 56, 42)]),
     ("white", [("circle", "red", 20, 32, 11)])),
    ("make the triangle red",
     ("white", [("tri", "blue", 12, 14, 52, 50)]), ("white", [("tri", "red", 12, 14, 52, 50)])),
    ("move the square to the right",
     ("gray", [("rect", "orange", 6, 22, 26, 42)]), ("gray", [("rect", "orange", 38, 22, 58, 42)])),
    ('change the text to "SHUT"', _sign("OPEN", "white", "blue", "gray"), _sign("SHUT", "white", "blue", "gray")),
    ("make the circle bigger",
     ("gray", [("circle", "yellow", 32, 32, 9)]), ("gray", [("circle", "yellow", 32, 32, 22)])),
    ("add a yellow star", ("purple", []), ("purple", [("star", "yellow", 32, 34, 22)])),
    ("add a white circle in the center", ("dark green", []), ("dark green", [("circle", "white", 32, 32, 14)])),
    ("make the text red",
     ("white", [("text", "black", "HI", 32, 32, 40, 28)]), ("white", [("text", "red", "HI", 32, 32, 40, 28)])),
    ("turn the square into a circle",
     ("blue", [("rect", "pink", 16, 16, 48, 48)]), ("blue", [("circle", "pink", 32, 32, 16)])),
]

I2I_EVAL = [
    ("make the circle red",
     ("yellow", [("circle", "blue", 32, 32, 18)]), ("yellow", [("circle", "red", 32, 32, 18)])),
    ('add the text "NEW"',
     ("white", [("rect", "green", 22, 8, 42, 28)]),
     ("white", [("rect", "green", 22, 8, 42, 28), ("text", "black", "NEW", 32, 48, 48, 16)])),
    ("remove the triangle",
     ("orange", [("tri", "green", 12, 14, 52, 50)]), ("orange", [])),
    ("make the background black",
     ("white", [("star", "red", 32, 34, 22)]), ("black", [("star", "red", 32, 34, 22)])),
]


def _clear(folder: str) -> None:
    """Removes the PNGs a previous run wrote, so a shorter list leaves no stale images behind."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".png") and name[:-4].replace("_", "").isdigit():
            os.remove(os.path.join(folder, name))


def _save(im: Image.Image, path: str) -> None:
    im.save(path, "PNG", optimize=True)          # no metadata chunks, so the bytes depend on the pixels only


def _write_prompts(path: str, prompts: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(p + "\n" for p in prompts))


def write_t2i(root: str) -> None:
    for prefix, items in (("", T2I_TRAIN), ("eval_", T2I_EVAL)):
        tdir = os.path.join(root, f"{prefix}target_images")
        _clear(tdir)
        for i, (_, scene) in enumerate(items):
            _save(render(scene), os.path.join(tdir, f"{i}.png"))
        _write_prompts(os.path.join(root, f"{prefix}prompts.txt"), [p for p, _ in items])


def write_i2i(root: str) -> None:
    for prefix, items in (("", I2I_TRAIN), ("eval_", I2I_EVAL)):
        tdir, sdir = os.path.join(root, f"{prefix}target_images"), os.path.join(root, f"{prefix}source_images")
        _clear(tdir)
        _clear(sdir)
        for i, (_, source, target) in enumerate(items):
            _save(render(source), os.path.join(sdir, f"{i}.png"))
            _save(render(target), os.path.join(tdir, f"{i}.png"))
        _write_prompts(os.path.join(root, f"{prefix}prompts.txt"), [p for p, _, _ in items])


def main(argv: list[str]) -> None:
    out = argv[1] if len(argv) > 1 else HERE
    write_t2i(os.path.join(out, "t2i"))
    write_i2i(os.path.join(out, "i2i"))
    print(f"wrote {out}/t2i ({len(T2I_TRAIN)} + {len(T2I_EVAL)} eval) and {out}/i2i "
          f"({len(I2I_TRAIN)} + {len(I2I_EVAL)} eval)")


if __name__ == "__main__":
    main(sys.argv)
