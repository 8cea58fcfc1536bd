"""`foundry prep photos OUT`: real photos that ship in packages, as a small labelled image
folder for tests and loader benchmarks (no download): scikit-image's bundled colour photos
(class ``skimage``) and the colour photos among OpenCV's samples (Debian ``opencv-doc``, class
``opencv``). Each is resized so that its shorter side is ``short_side`` pixels and saved as JPEG.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_foundry.data_prep.shard_format import PrepError

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
# Bundled with scikit-image (no download); stereo_motorcycle gives a left and a right photo.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "stereo_motorcycle")
# Colour photos among opencv-doc's samples (its others are grey, drawings or logos).
OPENCV_PHOTOS = ("HappyFish.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "baboon.jpg",
                 "board.jpg", "building.jpg", "butterfly.jpg", "ela_original.jpg", "fruits.jpg", "graf1.png",
                 "graf3.png", "home.jpg", "left.jpg", "leuvenA.jpg", "leuvenB.jpg", "licenseplate_motion.jpg",
                 "messi5.jpg", "orange.jpg", "right.jpg", "rubberwhale1.png", "rubberwhale2.png", "smarties.png",
                 "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg", "pca_test1.jpg", "pic2.png", "pic3.png")
HOW_TO_INSTALL = "pip install scikit-image and apt-get install opencv-doc (make setup does both)"


def package_photos() -> dict[str, list[tuple[str, np.ndarray]]]:
    """Class name -> (name, RGB uint8 array) of every photo above."""
    try:
        import skimage.data  # optional (the [test] extra): only these sample photos need it
    except ImportError:
        raise PrepError(f"scikit-image is not installed: {HOW_TO_INSTALL}") from None
    missing = [name for name in OPENCV_PHOTOS if not (OPENCV_DATA / name).is_file()]
    if missing:
        raise PrepError(f"{len(missing)} OpenCV sample photos missing from {OPENCV_DATA}: {HOW_TO_INSTALL}")
    skimage_photos = []
    for name in SKIMAGE_PHOTOS:
        loaded = getattr(skimage.data, name)()
        pictures = loaded[:2] if isinstance(loaded, tuple) else (loaded,)  # stereo: (left, right, disparity)
        skimage_photos += [(f"{name}_{i}" if len(pictures) > 1 else name, p) for i, p in enumerate(pictures)]
    opencv_photos = []
    for name in OPENCV_PHOTOS:
        with Image.open(OPENCV_DATA / name) as img:
            opencv_photos.append((Path(name).stem, np.asarray(img.convert("RGB"))))
    return {"opencv": opencv_photos, "skimage": skimage_photos}


def write_photo_folder(out: str | os.PathLike, short_side: int = 256, quality: int = 90, copies: int = 1) -> int:
    """``out/<class>/<name>.jpg`` for every package photo; returns how many files were written.
    ``copies`` > 1 writes each photo that many times (``<name>-<i>.jpg``): a larger folder for
    throughput benchmarks, where epochs of 40 images would be too short."""
    count = 0
    for label, photos in package_photos().items():
        folder = Path(out) / label
        folder.mkdir(parents=True, exist_ok=True)
        for name, pixels in photos:
            image = Image.fromarray(pixels)
            scale = short_side / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            for copy in range(copies):
                image.save(folder / (f"{name}.jpg" if copies == 1 else f"{name}-{copy}.jpg"), quality=quality)
                count += 1
    return count
