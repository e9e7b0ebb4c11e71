"""A tiny Broden-layout folder with a label that sits in two categories, for hand-counted IoUs (tests/test_dissection).

Segmentations are 4x4, images 8x8 (Broden's half size); every segmentation pixel is a 2x2 block of the image. The
images are black except where a unit of ``block_sequence`` should fire: red blocks for unit 0, green for unit 1, so
after its 2x2 average pool unit 0's map is the red mask and unit 1's the green one, at the segmentation size.

Categories object, part, material, scene. fabric is listed ``material(1);object(1)`` and its coverage is larger in
material (the train image d is all fabric), so its primary category is material, yet image a holds it in its object
mask and has no material column: the case where counting presence by index.csv column inflated IoU.

    val a: object mask OBJECT_A (car 4 px, fabric 3 px), scene street (image-level); unit 0 on fabric (2 px), unit 1
           on one unlabelled pixel
    val b: material mask MATERIAL_B (wood 4 px); unit 0 nowhere, unit 1 on one wood and one unlabelled pixel
    val c: object mask OBJECT_C (car 8 px), part mask PART_C (wheel 2 px); unit 0 on 2 car pixels off the wheel,
           unit 1 on one unlabelled pixel
    train d: material mask MATERIAL_D (fabric everywhere); no unit is looked at there (dissect the val split)
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from compute.models.registry import Preprocess

CAR, FABRIC, WHEEL, WOOD, STREET = 1, 2, 3, 4, 5
CATEGORY_CSV = """name,first,last,count,frequency
object,1,2,2,2
part,3,3,1,1
material,2,4,2,2
scene,5,5,1,1
"""
LABEL_CSV = """number,name,category,frequency,coverage,syns
1,car,object(2),2,0.750000,
2,fabric,material(1);object(1),2,1.187500,cloth
3,wheel,part(1),1,0.125000,
4,wood,material(1),1,0.250000,
5,street-s,scene(1),1,1.000000,
"""
C_CSV = {  # code,number,name,frequency,coverage per category: coverage in units of whole images
    "object": "1,1,car,2,0.750000\n2,2,fabric,1,0.187500\n",
    "part": "1,3,wheel,1,0.125000\n",
    "material": "1,2,fabric,1,1.000000\n2,4,wood,1,0.250000\n",
    "scene": "1,5,street-s,1,1.000000\n",
}
INDEX_CSV = """image,split,ih,iw,sh,sw,object,part,material,scene
a.png,val,8,8,4,4,a_object.png,,,5
b.png,val,8,8,4,4,,,b_material.png,
c.png,val,8,8,4,4,c_object.png,c_part.png,,
d.png,train,8,8,4,4,,,d_material.png,
"""
OBJECT_A = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, 2, 0], [0, 0, 0, 0]], np.int32)
MATERIAL_B = np.array([[4, 4, 0, 0], [4, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.int32)
OBJECT_C = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], np.int32)
PART_C = np.array([[3, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.int32)
MATERIAL_D = np.full((4, 4), 2, np.int32)
MASKS = {"a_object.png": OBJECT_A, "b_material.png": MATERIAL_B, "c_object.png": OBJECT_C, "c_part.png": PART_C,
         "d_material.png": MATERIAL_D}
ACTIVE = {  # image -> (unit 0's active segmentation pixels, unit 1's)
    "a.png": ([(2, 0), (2, 1)], [(3, 3)]),
    "b.png": ([], [(0, 0), (3, 0)]),
    "c.png": ([(0, 2), (0, 3)], [(3, 3)]),
    "d.png": ([], []),
}
THRESHOLDS = np.array([0.5, 0.5])
PREPROCESS = Preprocess(resize=8, crop=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels as 0..1


def write_mask(path: Path, labels: np.ndarray) -> None:
    """A Broden mask: label number = R + 256*G (cv2 writes BGR)."""
    bgr = np.zeros(labels.shape + (3,), np.uint8)
    bgr[:, :, 2] = labels % 256
    bgr[:, :, 1] = labels // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), bgr)


def write_image(path: Path, units: tuple[list, list]) -> None:
    """8x8 RGB, red (unit 0) and green (unit 1) 2x2 blocks at the given segmentation pixels."""
    rgb = np.zeros((8, 8, 3), np.uint8)
    for channel, pixels in enumerate(units):
        for row, col in pixels:
            rgb[2 * row:2 * row + 2, 2 * col:2 * col + 2, channel] = 255
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])


def write_broden(root: Path) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "category.csv").write_text(CATEGORY_CSV)
    (root / "label.csv").write_text(LABEL_CSV)
    (root / "index.csv").write_text(INDEX_CSV)
    for category, rows in C_CSV.items():
        (root / f"c_{category}.csv").write_text("code,number,name,frequency,coverage\n" + rows)
    for name, labels in MASKS.items():
        write_mask(root / "images" / name, labels)
    for name, units in ACTIVE.items():
        write_image(root / "images" / name, units)
    return root


def block_sequence() -> nn.Sequential:
    """Unit 0 = the red channel, unit 1 = the green one, averaged over 2x2 blocks: 8x8 images -> 4x4 maps."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])
        conv.bias.zero_()
    return nn.Sequential(OrderedDict(conv=conv, pool=nn.AvgPool2d(2))).eval()
