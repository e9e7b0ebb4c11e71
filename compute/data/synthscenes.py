"""SynthScenes: a procedurally drawn scene data set with pixel-level concept masks, deterministic from a seed.

Why it exists: the embedded demo needs a classification task that a small CNN learns on a CPU in minutes, and concept
annotations for Network Dissection, with the paper's phenomenon built in. Objects are shared between scene classes (a
bed in bedrooms and hostels; a car on streets, highways, parking lots and airports; a boat in harbours and on lakes),
so a unit that detects one matters for a subset of classes. Classes that share objects differ by their other
objects, by how many there are, or by the background (road markings, a shore, a sea band...).

The data set is written in the Broden layout (index.csv, label.csv, category.csv, c_<category>.csv, masks whose
per-pixel label is R + 256*G) so that ``compute.data.broden`` reads it like the real Broden, plus Places365-style
``categories.txt`` / ``train.txt`` / ``val.txt`` for classification (``compute.data.filelist``).

Concepts: colour (per pixel, the nearest of Broden's eleven colour names), object (every pixel: things and
background "stuff" such as sky, wall, grass; the topmost object wins), material and part (per pixel, where drawn),
scene (image-level, one per class) and texture (image-level: the pattern on the wall or the ground).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from compute.errors import UserError

VERSION = 1
SPLITS = ("train", "val")
CATEGORIES = ("color", "object", "material", "part", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "material", "part")

# Broden's eleven colour terms. A pixel gets the name of its nearest prototype in CIELAB; a name has several
# prototypes because one point per name misnames common tones (light sky blue would be nearest to pink).
COLOR_TONES = {
    "black": ((20, 20, 20),), "blue": ((40, 80, 210), (100, 150, 230), (160, 200, 245), (50, 100, 190)),
    "brown": ((125, 75, 35), (180, 130, 80)), "green": ((50, 150, 50), (30, 100, 50), (130, 190, 100)),
    "grey": ((128, 128, 128), (185, 185, 190), (80, 80, 85)), "orange": ((245, 140, 30),),
    "pink": ((245, 160, 200), (235, 205, 205)), "purple": ((130, 50, 170), (120, 100, 170)),
    "red": ((210, 30, 30), (150, 40, 30)), "white": ((245, 245, 245),), "yellow": ((245, 225, 40), (230, 210, 140)),
}
COLOR_PROTOTYPES = {name: tones[0] for name, tones in COLOR_TONES.items()}
BRIGHT = tuple(COLOR_PROTOTYPES[n] for n in ("red", "blue", "green", "yellow", "orange", "purple", "pink"))
STUFF = ("sky", "wall", "floor", "grass", "road", "water", "sand", "snow")
MATERIALS = ("wood", "fabric", "glass", "metal", "ceramic", "paper", "foliage", "stone", "skin", "plastic", "brick")
PARTS = ("wheel", "windshield", "headlight", "roof", "door", "head", "leg", "screen", "hull", "sail", "wing")
TEXTURES = ("striped", "banded", "dotted", "chequered", "grid", "zigzagged", "crosshatched", "flecked")

SHIFT = 4  # cv2 drawing with 4 fractional bits: sizes vary smoothly even at 64x64
ONE = 1 << SHIFT


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * ONE)), int(round(y * ONE))


def tone(rng: np.random.Generator, rgb, spread: float = 14.0) -> tuple[float, float, float]:
    """A colour near ``rgb``: every instance differs a little, so a detector has to generalise."""
    return tuple(np.clip(np.asarray(rgb, np.float32) + rng.normal(0.0, spread, 3), 0, 255).tolist())


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


class Canvas:
    """An RGB image and its object, part and material label maps, painted together.

    Every shape paints all maps at once, so occlusion is consistent: whatever is painted last owns the pixel in the
    image and in every mask.
    """

    def __init__(self, size: int):
        self.size = size
        self.rgb = np.zeros((size, size, 3), np.float32)
        self.maps = {cat: np.zeros((size, size), np.int32) for cat in ("object", "part", "material")}
        self._object = 0
        self._material = 0

    def begin(self, obj: str, material: str | None = None) -> None:
        """Label the following shapes as ``obj`` (and its default material)."""
        self._object = LABEL_NUMBER["object", obj]
        self._material = LABEL_NUMBER["material", material] if material else 0

    def paint(self, mask: np.ndarray, color, part: str | None = None, material: str | None = None) -> None:
        mask = mask.astype(bool)
        self.rgb[mask] = color
        self.maps["object"][mask] = self._object
        self.maps["part"][mask] = LABEL_NUMBER["part", part] if part else 0
        self.maps["material"][mask] = LABEL_NUMBER["material", material] if material else self._material

    def _blank(self) -> np.ndarray:
        return np.zeros((self.size, self.size), np.uint8)

    def rect(self, x0, y0, x1, y1, color, **labels) -> None:
        mask = self._blank()
        cv2.rectangle(mask, _pt(x0, y0), _pt(x1, y1), 1, -1, cv2.LINE_8, SHIFT)
        self.paint(mask, color, **labels)

    def circle(self, x, y, r, color, **labels) -> None:
        mask = self._blank()
        cv2.circle(mask, _pt(x, y), max(int(round(r * ONE)), ONE // 2), 1, -1, cv2.LINE_8, SHIFT)
        self.paint(mask, color, **labels)

    def ellipse(self, x, y, ax, ay, color, start=0, end=360, **labels) -> None:
        mask = self._blank()
        axes = (max(int(round(ax * ONE)), 1), max(int(round(ay * ONE)), 1))
        cv2.ellipse(mask, _pt(x, y), axes, 0, start, end, 1, -1, cv2.LINE_8, SHIFT)
        self.paint(mask, color, **labels)

    def poly(self, points, color, **labels) -> None:
        mask = self._blank()
        cv2.fillPoly(mask, [np.array([_pt(x, y) for x, y in points], np.int32)], 1, cv2.LINE_8, SHIFT)
        self.paint(mask, color, **labels)

    def line(self, x0, y0, x1, y1, width, color, **labels) -> None:
        mask = self._blank()
        cv2.line(mask, _pt(x0, y0), _pt(x1, y1), 1, max(int(round(width)), 1), cv2.LINE_8, SHIFT)
        self.paint(mask, color, **labels)


# --- Objects. Each draws with its base centre at (x, y) and height s (pixels). -----------------------------------


def draw_bed(c: Canvas, rng, x, y, s):
    w = 1.8 * s
    left, right = x - w / 2, x + w / 2
    wood = tone(rng, (120, 75, 35))
    c.rect(left, y - s, left + 0.14 * s, y, wood, material="wood")
    c.rect(left, y - 0.45 * s, right, y, wood, material="wood")
    c.rect(left + 0.14 * s, y - 0.7 * s, right, y - 0.45 * s, tone(rng, (235, 235, 235)))
    c.rect(left + 0.55 * s, y - 0.72 * s, right, y - 0.4 * s, tone(rng, pick(rng, BRIGHT)))
    c.ellipse(left + 0.32 * s, y - 0.76 * s, 0.16 * s, 0.09 * s, tone(rng, (250, 250, 250)))


def draw_lamp(c: Canvas, rng, x, y, s):
    c.ellipse(x, y, 0.14 * s, 0.04 * s, tone(rng, (60, 60, 60)), material="metal")
    c.line(x, y, x, y - 0.72 * s, 0.06 * s, tone(rng, (60, 60, 60)), material="metal")
    shade = tone(rng, pick(rng, (COLOR_PROTOTYPES["yellow"], COLOR_PROTOTYPES["white"], COLOR_PROTOTYPES["orange"])))
    c.poly([(x - 0.2 * s, y - 0.7 * s), (x + 0.2 * s, y - 0.7 * s), (x + 0.11 * s, y - s), (x - 0.11 * s, y - s)],
           shade)


def draw_window(c: Canvas, rng, x, y, s):
    w = s * rng.uniform(0.8, 1.3)
    frame = tone(rng, (240, 240, 235), 8)
    c.rect(x - w / 2, y - s, x + w / 2, y, frame)
    c.rect(x - w / 2 + 0.1 * s, y - 0.9 * s, x + w / 2 - 0.1 * s, y - 0.1 * s, tone(rng, (140, 190, 240)),
           material="glass")
    c.line(x, y - 0.9 * s, x, y - 0.1 * s, 0.07 * s, frame)
    c.line(x - w / 2, y - 0.5 * s, x + w / 2, y - 0.5 * s, 0.07 * s, frame)


def draw_painting(c: Canvas, rng, x, y, s):
    w = s * rng.uniform(1.0, 1.5)
    c.rect(x - w / 2, y - s, x + w / 2, y, tone(rng, pick(rng, ((120, 75, 35), (200, 160, 50), (30, 30, 30)))),
           material="wood")
    c.rect(x - w / 2 + 0.12 * s, y - 0.88 * s, x + w / 2 - 0.12 * s, y - 0.12 * s, tone(rng, pick(rng, BRIGHT)),
           material="paper")
    c.circle(x + rng.uniform(-0.2, 0.2) * w, y - 0.5 * s, 0.2 * s, tone(rng, pick(rng, BRIGHT)), material="paper")


def draw_table(c: Canvas, rng, x, y, s):
    w = 1.6 * s
    color = tone(rng, pick(rng, ((125, 75, 35), (150, 100, 55), (235, 235, 230))))
    c.rect(x - w / 2, y - s, x + w / 2, y - 0.8 * s, color)
    for side in (-1, 1):
        leg = x + side * (w / 2 - 0.1 * s)
        c.rect(leg - 0.06 * s, y - 0.8 * s, leg + 0.06 * s, y, color, part="leg")


def draw_chair(c: Canvas, rng, x, y, s):
    d = pick(rng, (-1, 1))
    color = tone(rng, pick(rng, ((125, 75, 35), COLOR_PROTOTYPES["red"], COLOR_PROTOTYPES["blue"])))
    c.rect(x - 0.3 * s, y - 0.52 * s, x + 0.3 * s, y - 0.42 * s, color)
    c.rect(x - d * 0.3 * s, y - s, x - d * 0.2 * s, y - 0.42 * s, color)
    for side in (-1, 1):
        c.line(x + side * 0.26 * s, y - 0.45 * s, x + side * 0.28 * s, y, 0.07 * s, color, part="leg")


def draw_stove(c: Canvas, rng, x, y, s):
    body = tone(rng, pick(rng, ((235, 235, 235), (160, 160, 165))))
    c.rect(x - 0.45 * s, y - s, x + 0.45 * s, y, body)
    c.rect(x - 0.45 * s, y - s, x + 0.45 * s, y - 0.88 * s, tone(rng, (40, 40, 40)))
    c.rect(x - 0.35 * s, y - 0.7 * s, x + 0.35 * s, y - 0.1 * s, tone(rng, (35, 35, 40)), part="door",
           material="glass")
    for k in (-0.25, 0.0, 0.25):
        c.circle(x + k * s, y - 0.79 * s, 0.05 * s, tone(rng, (20, 20, 20)))


def draw_sink(c: Canvas, rng, x, y, s):
    c.rect(x - 0.45 * s, y - 0.72 * s, x + 0.45 * s, y, tone(rng, pick(rng, ((125, 75, 35), (235, 235, 230)))),
           material="wood")
    c.line(x, y - 0.75 * s, x, y - s, 0.06 * s, tone(rng, (170, 170, 175)), material="metal")
    c.line(x, y - s, x + 0.15 * s, y - s, 0.06 * s, tone(rng, (170, 170, 175)), material="metal")
    c.ellipse(x, y - 0.75 * s, 0.42 * s, 0.13 * s, tone(rng, (245, 245, 245), 6))


def draw_toilet(c: Canvas, rng, x, y, s):
    white = tone(rng, (245, 245, 245), 6)
    c.rect(x - 0.3 * s, y - s, x + 0.3 * s, y - 0.62 * s, white)
    c.rect(x - 0.14 * s, y - 0.45 * s, x + 0.14 * s, y, white)
    c.ellipse(x, y - 0.5 * s, 0.36 * s, 0.14 * s, white)
    c.ellipse(x, y - 0.55 * s, 0.26 * s, 0.06 * s, tone(rng, (200, 200, 205), 6))


def draw_sofa(c: Canvas, rng, x, y, s):
    w = 2.0 * s
    color = tone(rng, pick(rng, BRIGHT + ((125, 75, 35),)), 10)
    seat = tuple(min(v * 1.15, 255) for v in color)
    c.rect(x - w / 2, y - s, x + w / 2, y - 0.45 * s, color)
    c.rect(x - w / 2, y - 0.5 * s, x + w / 2, y - 0.12 * s, seat)
    for side in (-1, 1):
        c.rect(x + side * w / 2 - 0.12 * s, y - 0.72 * s, x + side * w / 2 + 0.12 * s, y - 0.1 * s, color)
        c.rect(x + side * (w / 2 - 0.1 * s) - 0.05 * s, y - 0.12 * s, x + side * (w / 2 - 0.1 * s) + 0.05 * s, y,
               tone(rng, (40, 30, 20)), part="leg", material="wood")


def draw_computer(c: Canvas, rng, x, y, s):
    grey = tone(rng, (60, 60, 65), 8)
    c.rect(x - 0.28 * s, y - 0.08 * s, x + 0.28 * s, y, grey)
    c.rect(x - 0.06 * s, y - 0.32 * s, x + 0.06 * s, y - 0.06 * s, grey)
    c.rect(x - 0.55 * s, y - s, x + 0.55 * s, y - 0.3 * s, tone(rng, (25, 25, 28), 6))
    glow = tone(rng, pick(rng, ((60, 120, 230), (90, 200, 220))))
    c.rect(x - 0.47 * s, y - 0.92 * s, x + 0.47 * s, y - 0.38 * s, glow, part="screen", material="glass")


def draw_blackboard(c: Canvas, rng, x, y, s):
    w = 2.2 * s
    c.rect(x - w / 2, y - s, x + w / 2, y, tone(rng, (120, 75, 35)), material="wood")
    c.rect(x - w / 2 + 0.08 * s, y - 0.92 * s, x + w / 2 - 0.08 * s, y - 0.08 * s, tone(rng, (30, 75, 50), 8),
           material="stone")
    for _ in range(int(rng.integers(2, 4))):
        y0 = y - rng.uniform(0.25, 0.8) * s
        x0 = x - rng.uniform(0.3, 0.9) * w / 2
        c.line(x0, y0, x0 + rng.uniform(0.3, 0.8) * w / 2, y0 + rng.uniform(-0.1, 0.1) * s, 0.05 * s,
               tone(rng, (235, 235, 235), 6), material="stone")


def draw_bookshelf(c: Canvas, rng, x, y, s):
    w = 0.9 * s
    left = x - w / 2
    c.rect(left, y - s, x + w / 2, y, tone(rng, (110, 65, 30)))
    for shelf in range(3):
        bottom = y - 0.06 * s - shelf * 0.31 * s
        bx = left + 0.06 * s
        while bx < x + w / 2 - 0.1 * s:
            width = rng.uniform(0.05, 0.09) * s
            c.rect(bx, bottom - rng.uniform(0.18, 0.26) * s, bx + width, bottom, tone(rng, pick(rng, BRIGHT), 25),
                   material="paper")
            bx += width + 0.01 * s


def draw_person(c: Canvas, rng, x, y, s):
    shirt = tone(rng, pick(rng, BRIGHT + ((245, 245, 245),)))
    trousers = tone(rng, pick(rng, ((40, 60, 130), (30, 30, 30), (110, 80, 50))))
    for side in (-1, 1):
        c.line(x + side * 0.07 * s, y - 0.42 * s, x + side * 0.1 * s, y, 0.09 * s, trousers, part="leg")
        c.line(x + side * 0.15 * s, y - 0.72 * s, x + side * 0.24 * s, y - 0.45 * s, 0.07 * s, shirt)
    c.rect(x - 0.15 * s, y - 0.76 * s, x + 0.15 * s, y - 0.4 * s, shirt)
    c.circle(x, y - 0.88 * s, 0.11 * s, tone(rng, pick(rng, ((235, 195, 160), (170, 115, 75), (95, 65, 45)))),
             part="head", material="skin")


def draw_car(c: Canvas, rng, x, y, s):
    w = 2.2 * s
    d = pick(rng, (-1, 1))  # which way it faces
    body = tone(rng, pick(rng, (COLOR_PROTOTYPES["red"], COLOR_PROTOTYPES["blue"], (240, 240, 240), (30, 30, 30),
                                COLOR_PROTOTYPES["yellow"], (150, 150, 155))))
    c.poly([(x - d * 0.36 * w, y - 0.6 * s), (x - d * 0.22 * w, y - s), (x + d * 0.16 * w, y - s),
            (x + d * 0.3 * w, y - 0.6 * s)], body)
    c.poly([(x + d * 0.02 * w, y - 0.62 * s), (x + d * 0.02 * w, y - 0.92 * s), (x + d * 0.14 * w, y - 0.92 * s),
            (x + d * 0.25 * w, y - 0.62 * s)], tone(rng, (150, 200, 235)), part="windshield", material="glass")
    c.rect(x - w / 2, y - 0.62 * s, x + w / 2, y - 0.15 * s, body)
    c.rect(x + d * (w / 2 - 0.12 * s), y - 0.5 * s, x + d * w / 2, y - 0.38 * s, tone(rng, (250, 235, 120), 6),
           part="headlight", material="glass")
    for side in (-1, 1):
        cx = x + side * 0.3 * w
        c.circle(cx, y - 0.18 * s, 0.18 * s, tone(rng, (20, 20, 20), 5), part="wheel")
        c.circle(cx, y - 0.18 * s, 0.07 * s, tone(rng, (170, 170, 170), 8), part="wheel")


def draw_house(c: Canvas, rng, x, y, s):
    w = s * rng.uniform(0.9, 1.3)
    wall = tone(rng, pick(rng, ((230, 215, 180), (240, 240, 235), (170, 80, 60), (235, 215, 110))))
    c.rect(x - w / 2, y - 0.62 * s, x + w / 2, y, wall)
    c.poly([(x - w / 2 - 0.08 * s, y - 0.6 * s), (x, y - s), (x + w / 2 + 0.08 * s, y - 0.6 * s)],
           tone(rng, pick(rng, ((150, 40, 30), (90, 60, 40), (80, 80, 90)))), part="roof")
    c.rect(x - 0.1 * s, y - 0.34 * s, x + 0.1 * s, y, tone(rng, (110, 65, 30)), part="door", material="wood")
    for side in (-1, 1):
        cx = x + side * w * 0.3
        c.rect(cx - 0.08 * s, y - 0.48 * s, cx + 0.08 * s, y - 0.32 * s, tone(rng, (150, 200, 235)), material="glass")


def draw_sign(c: Canvas, rng, x, y, s):
    c.line(x, y, x, y - 0.65 * s, 0.06 * s, tone(rng, (150, 150, 155)))
    r, cy = 0.2 * s, y - 0.8 * s
    kind = int(rng.integers(3))
    if kind == 0:
        angles = np.pi / 8 + np.arange(8) * np.pi / 4
        c.poly(list(zip(x + r * np.cos(angles), cy + r * np.sin(angles))), tone(rng, COLOR_PROTOTYPES["red"]))
    elif kind == 1:
        c.rect(x - r, cy - r, x + r, cy + r, tone(rng, COLOR_PROTOTYPES["blue"]))
    else:
        c.poly([(x, cy - 1.2 * r), (x + 1.2 * r, cy), (x, cy + 1.2 * r), (x - 1.2 * r, cy)],
               tone(rng, COLOR_PROTOTYPES["yellow"]))
    c.line(x - 0.5 * r, cy, x + 0.5 * r, cy, 0.3 * r, tone(rng, (245, 245, 245), 5))


def draw_plane(c: Canvas, rng, x, y, s):
    d = pick(rng, (-1, 1))
    cy = y - 0.45 * s
    body = tone(rng, pick(rng, ((240, 240, 245), (180, 180, 190))), 6)
    wing = tuple(v * 0.8 for v in body)
    c.poly([(x + d * 0.75 * s, cy), (x + d * 1.05 * s, cy - 0.55 * s), (x + d * 1.12 * s, cy)], wing, part="wing")
    c.ellipse(x, cy, 1.1 * s, 0.15 * s, body)
    c.poly([(x - d * 0.15 * s, cy), (x + d * 0.25 * s, cy), (x - d * 0.3 * s, cy + 0.45 * s),
            (x - d * 0.5 * s, cy + 0.45 * s)], wing, part="wing")


def draw_boat(c: Canvas, rng, x, y, s):
    if rng.random() < 0.6:
        c.line(x, y - 0.35 * s, x, y - s, 0.05 * s, tone(rng, (110, 70, 35)), material="wood")
        c.poly([(x + 0.04 * s, y - 0.95 * s), (x + 0.04 * s, y - 0.42 * s), (x + 0.6 * s, y - 0.42 * s)],
               tone(rng, (245, 245, 245), 6), part="sail", material="fabric")
    else:
        c.rect(x - 0.35 * s, y - 0.65 * s, x + 0.25 * s, y - 0.33 * s, tone(rng, (240, 240, 240), 6), material="metal")
    c.poly([(x - 0.8 * s, y - 0.36 * s), (x + 0.8 * s, y - 0.36 * s), (x + 0.55 * s, y), (x - 0.55 * s, y)],
           tone(rng, pick(rng, ((240, 240, 240), (125, 75, 35), COLOR_PROTOTYPES["red"]))), part="hull")


def draw_umbrella(c: Canvas, rng, x, y, s):
    c.line(x, y, x, y - 0.8 * s, 0.05 * s, tone(rng, (230, 230, 230), 6))
    colors = (tone(rng, pick(rng, BRIGHT)), tone(rng, (245, 245, 245), 6))
    for k in range(4):
        c.ellipse(x, y - 0.72 * s, 0.75 * s, 0.28 * s, colors[k % 2], start=180 + 45 * k, end=225 + 45 * k)


def draw_sun(c: Canvas, rng, x, y, s):
    c.circle(x, y - s / 2, s / 2, tone(rng, pick(rng, (COLOR_PROTOTYPES["yellow"], (250, 200, 60))), 6))


def draw_cloud(c: Canvas, rng, x, y, s):
    white = tone(rng, pick(rng, ((250, 250, 250), (215, 215, 220))), 5)
    cy = y - s / 2
    for dx, dy, ax, ay in ((-0.55, 0.12, 0.45, 0.28), (0.5, 0.12, 0.45, 0.28), (0.0, -0.05, 0.6, 0.45)):
        c.ellipse(x + dx * s, cy + dy * s, ax * s, ay * s, white)


def draw_tree(c: Canvas, rng, x, y, s):
    c.rect(x - 0.06 * s, y - 0.45 * s, x + 0.06 * s, y, tone(rng, (100, 60, 30)), material="wood")
    if rng.random() < 0.35:
        green = tone(rng, (30, 100, 50))
        for k in range(3):
            base = y - (0.3 + 0.22 * k) * s
            half = (0.34 - 0.08 * k) * s
            c.poly([(x - half, base), (x + half, base), (x, base - 0.4 * s)], green)
    else:
        green = tone(rng, (55, 145, 55))
        c.circle(x, y - 0.68 * s, 0.32 * s, green)
        c.circle(x - 0.18 * s, y - 0.55 * s, 0.2 * s, green)
        c.circle(x + 0.18 * s, y - 0.55 * s, 0.2 * s, green)


def draw_bench(c: Canvas, rng, x, y, s):
    w = 1.8 * s
    wood = tone(rng, (135, 85, 40))
    legs = tone(rng, (50, 50, 50), 6)
    for side in (-1, 1):
        leg = x + side * (w / 2 - 0.15 * s)
        c.line(leg, y - s, leg, y, 0.1 * s, legs, part="leg", material="metal")
    c.rect(x - w / 2, y - s, x + w / 2, y - 0.7 * s, wood)
    c.rect(x - w / 2, y - 0.5 * s, x + w / 2, y - 0.36 * s, wood)


def draw_flower(c: Canvas, rng, x, y, s):
    c.line(x, y, x, y - 0.6 * s, 0.07 * s, tone(rng, (40, 130, 40)))
    petal = tone(rng, pick(rng, (COLOR_PROTOTYPES["red"], COLOR_PROTOTYPES["pink"], COLOR_PROTOTYPES["yellow"],
                                 COLOR_PROTOTYPES["purple"], (245, 245, 245), COLOR_PROTOTYPES["orange"])))
    cy = y - 0.75 * s
    for a in np.arange(5) * 2 * np.pi / 5:
        c.circle(x + 0.16 * s * np.cos(a), cy + 0.16 * s * np.sin(a), 0.12 * s, petal)
    c.circle(x, cy, 0.09 * s, tone(rng, (250, 210, 40), 8))


def draw_fence(c: Canvas, rng, x, y, s):
    w = s * rng.uniform(2.5, 4.0)
    color = tone(rng, pick(rng, ((240, 240, 235), (130, 85, 45))), 8)
    for level in (0.3, 0.7):
        c.rect(x - w / 2, y - (level + 0.07) * s, x + w / 2, y - level * s, color)
    px = x - w / 2
    while px < x + w / 2:
        c.poly([(px, y), (px, y - 0.85 * s), (px + 0.1 * s, y - s), (px + 0.2 * s, y - 0.85 * s), (px + 0.2 * s, y)],
               color)
        px += 0.36 * s


def draw_cactus(c: Canvas, rng, x, y, s):
    green = tone(rng, (60, 130, 60))
    c.rect(x - 0.11 * s, y - 0.9 * s, x + 0.11 * s, y, green)
    c.circle(x, y - 0.89 * s, 0.11 * s, green)
    for side, height in ((-1, 0.55), (1, 0.4)):
        arm = x + side * 0.3 * s
        c.rect(min(x, arm), y - (height - 0.08) * s, max(x, arm), y - height * s, green)
        c.rect(arm - 0.07 * s, y - (height + 0.3) * s, arm + 0.07 * s, y - (height - 0.08) * s, green)


def draw_rock(c: Canvas, rng, x, y, s):
    angles = np.sort(rng.uniform(0, np.pi, 7))
    radii = rng.uniform(0.75, 1.0, 7)
    top = [(x - 0.7 * s * r * np.cos(a), y - s * r * np.sin(a)) for a, r in zip(angles, radii)]
    c.poly([(x - 0.7 * s, y)] + top + [(x + 0.7 * s, y)], tone(rng, pick(rng, ((130, 130, 130), (120, 100, 80)))))


def draw_mountain(c: Canvas, rng, x, y, s):
    w = s * rng.uniform(2.0, 3.0)
    peak = x + rng.uniform(-0.2, 0.2) * w
    c.poly([(x - w / 2, y), (peak, y - s), (x + w / 2, y)],
           tone(rng, pick(rng, ((120, 115, 125), (125, 90, 70), (110, 90, 140)))))
    if rng.random() < 0.6:
        t = 0.3
        c.poly([(peak - t * (peak - x + w / 2), y - (1 - t) * s), (peak, y - s),
                (peak + t * (x + w / 2 - peak), y - (1 - t) * s)], tone(rng, (245, 245, 250), 5))


def draw_snowman(c: Canvas, rng, x, y, s):
    white = tone(rng, (245, 245, 250), 5)
    c.circle(x, y - 0.3 * s, 0.3 * s, white)
    c.circle(x, y - 0.8 * s, 0.2 * s, white)
    for side in (-1, 1):
        c.circle(x + side * 0.07 * s, y - 0.85 * s, 0.03 * s, (20, 20, 20))
    c.poly([(x, y - 0.82 * s), (x + 0.2 * s, y - 0.79 * s), (x, y - 0.76 * s)], tone(rng, COLOR_PROTOTYPES["orange"]))


def draw_swing(c: Canvas, rng, x, y, s):
    frame = tone(rng, pick(rng, (COLOR_PROTOTYPES["red"], COLOR_PROTOTYPES["blue"], COLOR_PROTOTYPES["yellow"])))
    for side in (-1, 1):
        top = x + side * 0.6 * s
        c.line(top - 0.2 * s, y, top, y - s, 0.09 * s, frame, material="metal")
        c.line(top + 0.2 * s, y, top, y - s, 0.09 * s, frame, material="metal")
    c.line(x - 0.6 * s, y - s, x + 0.6 * s, y - s, 0.09 * s, frame, material="metal")
    for seat in (-0.22, 0.22):
        for side in (-1, 1):
            c.line(x + (seat + side * 0.1) * s, y - s, x + (seat + side * 0.1) * s, y - 0.3 * s, 1,
                   tone(rng, (150, 150, 150), 6), material="metal")
        c.rect(x + (seat - 0.13) * s, y - 0.32 * s, x + (seat + 0.13) * s, y - 0.26 * s, tone(rng, (40, 40, 40)))


def draw_ball(c: Canvas, rng, x, y, s):
    c.circle(x, y - s / 2, s / 2, tone(rng, pick(rng, BRIGHT)))
    c.line(x - s / 2, y - s / 2, x + s / 2, y - s / 2, 0.15 * s, tone(rng, (245, 245, 245), 5))


@dataclass(frozen=True)
class Thing:
    """An object kind: how it is drawn, where it stands, its size and default material.

    where: 'up' objects hang in the upper region (sky or wall), 'down' objects stand in the ground region.
    y: the anchor's range as a fraction of that region (0 = top of the region); size: height, fraction of the image.
    """

    draw: Callable
    where: str
    size: tuple[float, float]
    material: str | None = None
    y: tuple[float, float] = (0.25, 0.95)
    indoor: bool = False
    outdoor: bool = False


THINGS: dict[str, Thing] = {
    "bed": Thing(draw_bed, "down", (0.22, 0.3), "fabric", (0.5, 0.95), indoor=True),
    "lamp": Thing(draw_lamp, "down", (0.3, 0.45), "fabric", (0.2, 0.7), indoor=True, outdoor=True),
    "window": Thing(draw_window, "up", (0.2, 0.32), "wood", (0.35, 0.65), indoor=True),
    "painting": Thing(draw_painting, "up", (0.14, 0.22), None, (0.3, 0.6), indoor=True),
    "table": Thing(draw_table, "down", (0.16, 0.22), "wood", (0.3, 0.9), indoor=True),
    "chair": Thing(draw_chair, "down", (0.18, 0.25), "wood", (0.4, 0.95), indoor=True),
    "stove": Thing(draw_stove, "down", (0.24, 0.32), "metal", (0.1, 0.5), indoor=True),
    "sink": Thing(draw_sink, "down", (0.22, 0.3), "ceramic", (0.1, 0.6), indoor=True),
    "toilet": Thing(draw_toilet, "down", (0.2, 0.27), "ceramic", (0.3, 0.8), indoor=True),
    "sofa": Thing(draw_sofa, "down", (0.22, 0.3), "fabric", (0.4, 0.9), indoor=True),
    "computer": Thing(draw_computer, "down", (0.16, 0.22), "plastic", (0.3, 0.8), indoor=True),
    "blackboard": Thing(draw_blackboard, "up", (0.2, 0.27), None, (0.35, 0.6), indoor=True),
    "bookshelf": Thing(draw_bookshelf, "down", (0.45, 0.6), "wood", (0.05, 0.35), indoor=True),
    "person": Thing(draw_person, "down", (0.26, 0.4), "fabric", indoor=True, outdoor=True),
    "car": Thing(draw_car, "down", (0.1, 0.15), "metal", outdoor=True),
    "house": Thing(draw_house, "down", (0.25, 0.4), "brick", (0.0, 0.12), outdoor=True),
    "sign": Thing(draw_sign, "down", (0.25, 0.35), "metal", (0.2, 0.8), outdoor=True),
    "plane": Thing(draw_plane, "up", (0.14, 0.2), "metal", (0.3, 0.7), outdoor=True),
    "boat": Thing(draw_boat, "down", (0.14, 0.22), "wood", (0.2, 0.9), outdoor=True),
    "umbrella": Thing(draw_umbrella, "down", (0.22, 0.32), "fabric", (0.3, 0.9), outdoor=True),
    "sun": Thing(draw_sun, "up", (0.1, 0.16), None, (0.2, 0.6), outdoor=True),
    "cloud": Thing(draw_cloud, "up", (0.08, 0.13), None, (0.2, 0.6), outdoor=True),
    "tree": Thing(draw_tree, "down", (0.3, 0.45), "foliage", (0.05, 0.9), outdoor=True),
    "bench": Thing(draw_bench, "down", (0.14, 0.2), "wood", (0.3, 0.9), outdoor=True),
    "flower": Thing(draw_flower, "down", (0.09, 0.13), "foliage", (0.3, 0.95), outdoor=True),
    "fence": Thing(draw_fence, "down", (0.1, 0.14), "wood", (0.1, 0.6), outdoor=True),
    "cactus": Thing(draw_cactus, "down", (0.2, 0.32), "foliage", (0.2, 0.9), outdoor=True),
    "rock": Thing(draw_rock, "down", (0.1, 0.16), "stone", (0.2, 0.95), outdoor=True),
    "mountain": Thing(draw_mountain, "down", (0.25, 0.45), "stone", (0.0, 0.04), outdoor=True),
    "snowman": Thing(draw_snowman, "down", (0.18, 0.26), None, (0.3, 0.9), outdoor=True),
    "swing": Thing(draw_swing, "down", (0.28, 0.36), None, (0.2, 0.7), outdoor=True),
    "ball": Thing(draw_ball, "down", (0.06, 0.09), "plastic", (0.3, 0.95), outdoor=True),
}
OBJECTS = STUFF + tuple(THINGS)


# --- Backgrounds: the upper region (wall or sky), the ground, and scene-specific details. ------------------------

WALLS = ((230, 220, 190), (200, 220, 235), (210, 235, 200), (240, 240, 235), (235, 205, 205), (190, 190, 190))
FLOORS = ((150, 100, 60), (180, 180, 180), (200, 170, 130))
GROUNDS = {"grass": (75, 150, 60), "road": (110, 110, 115), "water": (50, 100, 190), "sand": (225, 200, 140),
           "snow": (240, 245, 250)}


def lane_marks(c: Canvas, rng, h):
    y = h + (c.size - h) * rng.uniform(0.35, 0.6)
    step = c.size / rng.uniform(4, 6)
    x = rng.uniform(-step, 0)
    c.begin("road")
    while x < c.size:
        c.rect(x, y, x + step / 2, y + max(1.0, 0.03 * c.size), tone(rng, (245, 245, 245), 5))
        x += step


def parking_lines(c: Canvas, rng, h):
    top, bottom = h + (c.size - h) * 0.3, h + (c.size - h) * 0.75
    step = c.size / rng.uniform(5, 7)
    c.begin("road")
    x = rng.uniform(0, step)
    while x < c.size:
        c.line(x, top, x - 0.1 * step, bottom, max(1.0, 0.025 * c.size), tone(rng, (245, 245, 245), 5))
        x += step


def runway(c: Canvas, rng, h):
    g = c.size - h
    top, bottom = h + g * rng.uniform(0.25, 0.4), h + g * rng.uniform(0.65, 0.85)
    c.begin("road")
    c.rect(0, top, c.size, bottom, tone(rng, (100, 100, 105), 8))
    middle = (top + bottom) / 2
    x = rng.uniform(-8, 0)
    while x < c.size:
        c.rect(x, middle - 0.5, x + 0.08 * c.size, middle + 0.5, tone(rng, (245, 245, 245), 5))
        x += 0.16 * c.size


def quay(c: Canvas, rng, h):
    c.begin("road")
    c.rect(0, h, c.size, h + (c.size - h) * rng.uniform(0.08, 0.15), tone(rng, (140, 135, 130), 8))


def shore(c: Canvas, rng, h):
    c.begin("grass")
    c.rect(0, h, c.size, h + (c.size - h) * rng.uniform(0.06, 0.12), tone(rng, GROUNDS["grass"]))


def sea(c: Canvas, rng, h):
    c.begin("water")
    bottom = h + (c.size - h) * rng.uniform(0.25, 0.45)
    c.rect(0, h, c.size, bottom, tone(rng, GROUNDS["water"]))
    c.line(0, bottom, c.size, bottom, max(1.0, 0.03 * c.size), tone(rng, (240, 245, 250), 5))


def falls(c: Canvas, rng, h):
    x = c.size * rng.uniform(0.35, 0.65)
    half = c.size * rng.uniform(0.08, 0.14)
    c.begin("water")
    c.rect(x - half, c.size * rng.uniform(0.05, 0.2), x + half, c.size, tone(rng, (185, 215, 240), 8))
    c.ellipse(x, c.size * 0.95, 2.2 * half, 0.12 * c.size, tone(rng, GROUNDS["water"]))


def furrows(c: Canvas, rng, h):
    c.begin("grass")
    y = h + 2.0
    while y < c.size:
        c.line(0, y, c.size, y + rng.uniform(-1, 1), max(1.0, 0.02 * c.size), tone(rng, (110, 120, 50), 8))
        y += (y - h) * 0.3 + 2.5


def dunes(c: Canvas, rng, h):
    c.begin("sand")
    for _ in range(int(rng.integers(1, 3))):
        c.ellipse(c.size * rng.uniform(0, 1), h + 1, c.size * rng.uniform(0.3, 0.5), c.size * rng.uniform(0.06, 0.12),
                  tone(rng, (215, 185, 125), 8), start=180, end=360)


def slope(c: Canvas, rng, h):
    c.begin("snow")
    rise = c.size * rng.uniform(0.1, 0.2)
    left, right = (h - rise, h) if rng.random() < 0.5 else (h, h - rise)
    c.poly([(0, left), (c.size, right), (c.size, c.size), (0, c.size)], tone(rng, GROUNDS["snow"], 5))


@dataclass(frozen=True)
class Item:
    """A characteristic object of a scene class: its chance to appear, how many, and overrides of its region.

    on: stand on the top of this other object when it was drawn (a computer on a table).
    """

    name: str
    p: float
    count: tuple[int, int] = (1, 1)
    y: tuple[float, float] | None = None
    on: str | None = None


@dataclass(frozen=True)
class Scene:
    name: str
    grounds: tuple[str, ...]  # 'floor' makes an indoor scene (wall above); else sky above this ground
    items: tuple[Item, ...]
    extra: Callable | None = None

    @property
    def indoor(self) -> bool:
        return self.grounds == ("floor",)


It = Item
SCENES: tuple[Scene, ...] = (
    Scene("bedroom", ("floor",), (It("bed", .9), It("lamp", .6), It("window", .6), It("painting", .4))),
    Scene("hostel", ("floor",), (It("bed", .95, (2, 3)), It("window", .5), It("person", .5))),
    Scene("kitchen", ("floor",), (It("stove", .85), It("sink", .6), It("table", .4), It("chair", .4),
                                  It("window", .4))),
    Scene("bathroom", ("floor",), (It("toilet", .85), It("sink", .8), It("window", .3))),
    Scene("living_room", ("floor",), (It("sofa", .95), It("lamp", .5), It("painting", .6), It("table", .4))),
    Scene("office", ("floor",), (It("table", .9), It("computer", .9, on="table"), It("chair", .6), It("window", .3))),
    Scene("classroom", ("floor",), (It("blackboard", .9), It("table", .7, (2, 3), (0.5, 0.95)), It("chair", .5, (1, 2)),
                                    It("person", .4))),
    Scene("library", ("floor",), (It("bookshelf", .95, (1, 3)), It("table", .4), It("person", .5), It("lamp", .3))),
    Scene("street", ("road",), (It("house", .9, (1, 3)), It("car", .8, (1, 2)), It("person", .5), It("sign", .4),
                                It("tree", .3, y=(0.0, 0.1)))),
    Scene("highway", ("road",), (It("car", .95, (2, 4)), It("sign", .5), It("cloud", .5)), lane_marks),
    Scene("parking_lot", ("road",), (It("car", .95, (3, 5), (0.5, 0.7)), It("lamp", .4), It("sign", .3)),
          parking_lines),
    Scene("airport", ("grass",), (It("plane", .95, (1, 2)), It("car", .3), It("cloud", .5)), runway),
    Scene("harbor", ("water",), (It("boat", .95, (1, 3)), It("house", .7, (1, 3), (0.0, 0.05)), It("cloud", .3)), quay),
    Scene("lake", ("water",), (It("boat", .6), It("tree", .8, (1, 3), (0.0, 0.08)), It("mountain", .5)), shore),
    Scene("beach", ("sand",), (It("umbrella", .85, (1, 2)), It("person", .6), It("sun", .5), It("ball", .3)), sea),
    Scene("waterfall", ("grass",), (It("rock", .9, (2, 3)), It("tree", .6)), falls),
    Scene("forest", ("grass",), (It("tree", 1.0, (4, 7)), It("flower", .2))),
    Scene("park", ("grass",), (It("tree", .8, (1, 3)), It("bench", .85), It("person", .6), It("flower", .3))),
    Scene("garden", ("grass",), (It("flower", .95, (3, 6)), It("fence", .7), It("tree", .4))),
    Scene("farm", ("grass",), (It("house", .8), It("fence", .8), It("tree", .5), It("sun", .4)), furrows),
    Scene("desert", ("sand",), (It("cactus", .9, (1, 3)), It("rock", .6), It("sun", .7)), dunes),
    Scene("mountain", ("grass", "snow"), (It("mountain", 1.0, (1, 3)), It("cloud", .6), It("rock", .4))),
    Scene("ski_slope", ("snow",), (It("person", .8, (1, 2)), It("tree", .7, (1, 3)), It("snowman", .4),
                                   It("mountain", .4)), slope),
    Scene("playground", ("sand", "grass"), (It("swing", .85), It("ball", .6), It("person", .6), It("fence", .4))),
)
del It
CLASSES: tuple[str, ...] = tuple(scene.name for scene in SCENES)


def _concept_keys() -> tuple[tuple[str, str], ...]:
    """(category, name) in label-number order (number = position + 1).

    Fixed by the code, not by frequencies as in Broden, so label numbers do not change with the data set's size.
    """
    return (tuple(("color", n) for n in COLOR_PROTOTYPES) + tuple(("object", n) for n in OBJECTS)
            + tuple(("material", n) for n in MATERIALS) + tuple(("part", n) for n in PARTS)
            + tuple(("scene", n) for n in CLASSES) + tuple(("texture", n) for n in TEXTURES))


def _label_name(category: str, name: str) -> str:
    """Broden's '-c' / '-s' suffixes for colours and scenes keep every name unique (scene 'mountain-s' vs object
    'mountain')."""
    return {"color": f"{name}-c", "scene": f"{name}-s"}.get(category, name)


LABEL_NUMBER: dict[tuple[str, str], int] = {key: n for n, key in enumerate(_concept_keys(), start=1)}
CONCEPTS: tuple[tuple[str, str], ...] = tuple((_label_name(cat, name), cat) for cat, name in LABEL_NUMBER)


# --- Rendering one image. ------------------------------------------------------------------------------------------


def texture_pattern(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean pattern that the background region is modulated with."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 8))
    xx, yy = xx + int(rng.integers(period)), yy + int(rng.integers(period))
    if name == "striped":
        return ((xx + yy) // (period // 2 + 1)) % 2 == 0
    if name == "banded":
        return (yy // (period + 2)) % 2 == 0
    if name == "dotted":
        return ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) <= (period / 4 + 0.5) ** 2
    if name == "chequered":
        return ((xx // period) + (yy // period)) % 2 == 0
    if name == "grid":
        return (xx % period == 0) | (yy % period == 0)
    if name == "zigzagged":
        wave = np.abs((xx % (2 * period)) - period)
        return ((yy + wave) // (period // 2 + 1)) % 2 == 0
    if name == "crosshatched":
        return ((xx + yy) % period == 0) | ((xx - yy) % period == 0)
    if name == "flecked":
        return rng.random((size, size)) < 0.15
    raise ValueError(name)


def _background(c: Canvas, rng, scene: Scene, ground: str, texture: str) -> float:
    """Paint the upper region, the ground and the texture; return the horizon's y (pixels)."""
    size = c.size
    if scene.indoor:
        h = size * rng.uniform(0.55, 0.68)
        c.begin("wall")
        c.rect(0, 0, size, h, tone(rng, pick(rng, WALLS), 8))
        c.begin("floor")
        c.rect(0, h, size, size, tone(rng, pick(rng, FLOORS), 8))
        region = c.maps["object"] == LABEL_NUMBER["object", "wall"]
    else:
        h = size * rng.uniform(0.35, 0.5)
        c.begin("sky")
        top = np.asarray(tone(rng, pick(rng, ((90, 150, 230), (180, 185, 195))), 8), np.float32)
        c.rect(0, 0, size, h, tuple(top))
        fade = np.linspace(0.0, 0.35, size, dtype=np.float32)[:, None, None]
        c.rgb[:] = c.rgb * (1 - fade) + 255 * fade  # the sky lightens towards the horizon
        c.begin(ground)
        c.rect(0, h, size, size, tone(rng, GROUNDS[ground], 8))
        region = c.maps["object"] == LABEL_NUMBER["object", ground]
    pattern = texture_pattern(texture, size, rng) & region
    if rng.random() < 0.5:
        c.rgb[pattern] *= rng.uniform(0.6, 0.78)
    else:
        c.rgb[pattern] += (255 - c.rgb[pattern]) * rng.uniform(0.3, 0.5)
    if scene.extra:
        scene.extra(c, rng, h)
    return h


@dataclass
class Placement:
    name: str
    x: float
    y: float  # base (pixels)
    s: float  # height (pixels)
    order: tuple  # drawing order: upper region first, then far to near


def _place(rng, name: str, y_range, h: float, size: int, host: Placement | None = None) -> Placement:
    thing = THINGS[name]
    lo, hi = thing.size
    if host is not None:
        s = rng.uniform(lo, hi) * size
        return Placement(name, host.x + rng.uniform(-0.25, 0.25) * host.s, host.y - host.s, s, host.order + (1,))
    t = rng.uniform(*y_range)
    x = rng.uniform(0.08, 0.92) * size
    if thing.where == "up":
        s = rng.uniform(lo, hi) * size
        centre = t * h
        return Placement(name, x, centre + s / 2, s, (0, 0.0))
    y = h + t * (size - h)
    s = rng.uniform(lo, hi) * size * (0.75 + 0.5 * t)  # nearer is bigger
    return Placement(name, x, y, s, (1, y))


def _layout(rng, scene: Scene, h: float, size: int) -> list[Placement]:
    """Where the characteristic objects and a few distractors go, in drawing order."""
    placed: list[Placement] = []
    for item in scene.items:
        if rng.random() >= item.p:
            continue
        for _ in range(int(rng.integers(item.count[0], item.count[1] + 1))):
            host = None
            if item.on:
                hosts = [p for p in placed if p.name == item.on]
                host = hosts[-1] if hosts else None
            placed.append(_place(rng, item.name, item.y or THINGS[item.name].y, h, size, host))
    own = {item.name for item in scene.items}
    pool = sorted(n for n, t in THINGS.items() if (t.indoor if scene.indoor else t.outdoor) and n not in own)
    for _ in range(int(rng.choice(3, p=(0.5, 0.35, 0.15)))):
        name = pick(rng, pool)
        placed.append(_place(rng, name, THINGS[name].y, h, size))
    return sorted(placed, key=lambda p: p.order)


@dataclass
class Rendered:
    """One image and its annotations: rgb uint8 [H, W, 3]; pixel: category -> int32 label map; image-level labels."""

    rgb: np.ndarray
    pixel: dict[str, np.ndarray]
    scene: int
    texture: int


_TONES = [(name, rgb) for name, tones in COLOR_TONES.items() for rgb in tones]
_LAB_TONES = cv2.cvtColor(np.array([[rgb for _, rgb in _TONES]], np.uint8), cv2.COLOR_RGB2LAB)[0].astype(np.float32)
_TONE_NUMBERS = np.array([LABEL_NUMBER["color", name] for name, _ in _TONES], np.int32)


def color_labels(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel colour concept: the nearest named colour in CIELAB (as perceived, not as drawn)."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32).reshape(-1, 3)
    # |lab - t|^2 without the |lab|^2 term, which is the same for every tone t.
    distance = (_LAB_TONES ** 2).sum(1) - 2 * lab @ _LAB_TONES.T
    return _TONE_NUMBERS[distance.argmin(1)].reshape(rgb.shape[:2])


def image_seed(seed: int, split: str, class_index: int, number: int) -> list[int]:
    """Entropy for one image's generator: images are independent, so workers may draw them in any order."""
    return [seed, SPLITS.index(split), class_index, number]


def render(seed: int, split: str, class_index: int, number: int, size: int = 64) -> Rendered:
    """Draw image ``number`` of a class and split; the same arguments always give the same pixels and masks."""
    rng = np.random.default_rng(image_seed(seed, split, class_index, number))
    scene = SCENES[class_index]
    texture = pick(rng, TEXTURES)
    c = Canvas(size)
    h = _background(c, rng, scene, pick(rng, scene.grounds), texture)
    for p in _layout(rng, scene, h, size):
        thing = THINGS[p.name]
        c.begin(p.name, thing.material)
        thing.draw(c, rng, p.x, p.y, p.s)
    noisy = c.rgb * rng.uniform(0.9, 1.1) + rng.normal(0.0, 3.0, c.rgb.shape)
    rgb = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    pixel = {"color": color_labels(rgb), **c.maps}
    return Rendered(rgb, pixel, LABEL_NUMBER["scene", scene.name], LABEL_NUMBER["texture", texture])


# --- Writing the data set. -----------------------------------------------------------------------------------------


def encode_labels(labels: np.ndarray) -> np.ndarray:
    """Broden's mask encoding, label = R + 256*G, as a BGR array for cv2.imwrite."""
    out = np.zeros(labels.shape + (3,), np.uint8)
    out[:, :, 2] = labels & 0xFF
    out[:, :, 1] = labels >> 8
    return out


def _write_png(path: Path, bgr: np.ndarray) -> None:
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"could not write {path}")


def _make_image(task) -> tuple[list, dict]:
    """Render and save one image with its masks; return its index.csv row and, per label number present, the
    fraction of the image it covers (1 for image-level labels)."""
    root, seed, split, class_index, number, size = task
    rendered = render(seed, split, class_index, number, size)
    stem = f"{split}/{CLASSES[class_index]}/{number:05d}"
    folder = Path(root) / "images"
    _write_png(folder / f"{stem}.png", rendered.rgb[:, :, ::-1])
    cells = {"scene": str(rendered.scene), "texture": str(rendered.texture)}
    stats = {rendered.scene: 1.0, rendered.texture: 1.0}
    for category in PIXEL_CATEGORIES:
        labels = rendered.pixel[category]
        numbers, counts = np.unique(labels[labels > 0], return_counts=True)
        if not len(numbers):
            cells[category] = ""
            continue
        mask_name = f"masks/{stem}_{category}.png"
        _write_png(folder / mask_name, encode_labels(labels))
        cells[category] = mask_name
        for n, k in zip(numbers.tolist(), counts.tolist()):
            stats[n] = k / labels.size
    row = [f"{stem}.png", split, size, size, size, size] + [cells[c] for c in CATEGORIES]
    return row, stats


def _settings(seed: int, train_per_class: int, val_per_class: int, image_size: int) -> dict:
    return {"generator": "synthscenes", "version": VERSION, "seed": seed, "image_size": image_size,
            "train_per_class": train_per_class, "val_per_class": val_per_class}


def _read_settings(root: Path) -> dict | None:
    try:
        return json.loads((root / "settings.json").read_text())
    except (OSError, ValueError):
        return None


def _matches(root: Path, settings: dict) -> bool:
    found = _read_settings(root)
    return found is not None and all(found.get(k) == v for k, v in settings.items())


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_label_files(root: Path, frequency: dict, coverage: dict) -> None:
    """label.csv, category.csv and c_<category>.csv, with Broden's columns and statistics.

    frequency: label -> images it appears in; coverage: label -> summed fraction of those images it covers.
    """
    labels = []
    for number, (name, category) in enumerate(CONCEPTS, start=1):
        labels.append([number, name, f"{category}({frequency[number]})", frequency[number],
                       f"{coverage[number]:f}", ""])
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], labels)
    rows = []
    for category in CATEGORIES:
        numbers = [n for n, (_, cat) in enumerate(CONCEPTS, start=1) if cat == category]
        rows.append([category, numbers[0], numbers[-1], len(numbers), sum(frequency[n] for n in numbers)])
        _write_csv(root / f"c_{category}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [[code, n, CONCEPTS[n - 1][0], frequency[n], f"{coverage[n]:f}"]
                    for code, n in enumerate(numbers, start=1)])
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"], rows)


def _write_class_files(root: Path, rows: list) -> None:
    """Places365-style categories.txt and per-split file lists, for training and validating classifiers."""
    (root / "categories.txt").write_text("".join(f"/{n[0]}/{n} {i}\n" for i, n in enumerate(CLASSES)))
    for split in SPLITS:
        lines = [f"{row[0]} {CLASSES.index(row[0].split('/')[1])}\n" for row in rows if row[1] == split]
        (root / f"{split}.txt").write_text("".join(lines))


def _build(tmp: Path, settings: dict, workers: int, progress: bool) -> None:
    seed, size = settings["seed"], settings["image_size"]
    tasks = []
    for split in SPLITS:
        for class_index, name in enumerate(CLASSES):
            (tmp / "images" / split / name).mkdir(parents=True)
            (tmp / "images" / "masks" / split / name).mkdir(parents=True)
            tasks += [(str(tmp), seed, split, class_index, i, size) for i in range(settings[f"{split}_per_class"])]
    frequency, coverage = defaultdict(int), defaultdict(float)
    with tqdm(total=len(tasks), desc="SynthScenes", unit="img", disable=not progress) as bar:
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers, initializer=cv2.setNumThreads,
                                                           initargs=(1,)) as pool:
                results = pool.imap(_make_image, tasks, chunksize=64)
                rows = _collect(results, frequency, coverage, bar)
        else:
            rows = _collect(map(_make_image, tasks), frequency, coverage, bar)
    _write_csv(tmp / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES], rows)
    _write_label_files(tmp, frequency, coverage)
    _write_class_files(tmp, rows)
    counts = {split: len(CLASSES) * settings[f"{split}_per_class"] for split in SPLITS}
    concepts = {cat: sum(1 for _, c in CONCEPTS if c == cat) for cat in CATEGORIES}
    summary = {**settings, "classes": list(CLASSES), "images": counts, "concepts": concepts}
    (tmp / "settings.json").write_text(json.dumps(summary, indent=1) + "\n")  # written last: marks completeness


def _collect(results, frequency, coverage, bar) -> list:
    rows = []
    for row, stats in results:
        rows.append(row)
        for number, covered in stats.items():
            frequency[number] += 1
            coverage[number] += covered
        bar.update()
    return rows


def _remove_stale(root: Path) -> None:
    """Delete temporary folders left by generations that were killed (their process is gone)."""
    for path in root.parent.glob(f".{root.name}.partial-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def generate(root, seed: int = 0, train_per_class: int = 200, val_per_class: int = 200, image_size: int = 64, *,
             workers: int | None = None, progress: bool = True) -> Path:
    """Generate SynthScenes at ``root`` (Broden layout plus Places365 file lists); return ``root``.

    The data set is built in a temporary sibling folder and renamed into place, so ``root`` only ever holds a complete
    data set. A complete one with the same settings is kept as it is; one with other settings (or from another
    generator version) is replaced. workers: processes (default: the CPU count for large data sets, else 1).
    """
    root = Path(root).expanduser().resolve()
    if train_per_class < 1 or val_per_class < 1 or image_size < 32:
        raise UserError(f"SynthScenes needs at least 1 image per class and split and image_size >= 32 "
                        f"(got {train_per_class}, {val_per_class}, {image_size})")
    settings = _settings(seed, train_per_class, val_per_class, image_size)
    if _matches(root, settings):
        return root
    if root.exists() and _read_settings(root) is None and any(root.iterdir()):
        raise UserError(f"{root} exists and is not a SynthScenes data set: remove it or choose another --data-dir")
    total = len(CLASSES) * (train_per_class + val_per_class)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total >= 2000 else 1
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(tmp, settings, workers, progress)
        _install(tmp, root, settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _install(tmp: Path, root: Path, settings: dict) -> None:
    """Move the finished data set to ``root``, replacing an outdated one; tolerate a concurrent identical build."""
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        if _matches(root, settings):  # another process finished the same data set meanwhile
            return
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if not _matches(root, settings):
            raise
    shutil.rmtree(old, ignore_errors=True)


def ensure(data_dir, seed: int = 0, **sizes) -> Path:
    """The SynthScenes data set for ``seed`` under ``<data_dir>/datasets``, generated when missing."""
    return generate(Path(data_dir) / "datasets" / f"synthscenes-seed{seed}", seed=seed, **sizes)
