"""Writes the npy reader's test data with NumPy itself, so that the reader is
tested on files numpy.save and numpy.lib.format write, not on files our own
writer makes.

    python make_npy_cases.py SRC OUT

SRC is an HDF5 data set (deepcam-data synth). For each case below, OUT/<case>/
gets npy/ (the case's .npy pairs) and h5/ (the same values as float32 data
and int64 labels in the HDF5 layout): the hdf5 reader on h5/ is the expected
result of the npy reader on npy/. OUT/bad/ gets files the reader must refuse.
"""
import os
import shutil
import sys

import h5py
import numpy as np

# name: (data dtype, label dtype, format version or None for numpy.save, Fortran order)
CASES = {
    "f32": ("<f4", "<i4", None, False),
    "f16_u8": ("<f2", "|u1", None, False),
    "f64be_i8be": (">f8", ">i8", None, False),
    "f32be_fortran_f4": (">f4", "<f4", None, True),
    "v2_i2": ("<f4", "<i2", (2, 0), False),
    "v3_f8_u2": ("<f8", "<u2", (3, 0), False),
}


def save(path, array, version):
    if version is None:
        np.save(path, array)
        return
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version)


def main(src, out):
    for name, (data_dtype, label_dtype, version, fortran) in CASES.items():
        for split in ("train", "validation"):
            npy_dir = os.path.join(out, name, "npy", split)
            h5_dir = os.path.join(out, name, "h5", split)
            os.makedirs(npy_dir)
            os.makedirs(h5_dir)
            for file in sorted(os.listdir(os.path.join(src, split))):
                with h5py.File(os.path.join(src, split, file), "r") as f:
                    data = f["climate/data"][...]
                    if data_dtype == "<f2":
                        # Pressures reach 1e5, beyond float16's 65504: scale
                        # by a power of two, which adds no rounding.
                        data = data * np.float32(0.25)
                    data = data.astype(data_dtype)
                    labels = f["climate/labels_0"][...].astype(label_dtype)
                if fortran:
                    data = np.asfortranarray(data)
                    labels = np.asfortranarray(labels)
                stem = file[len("data-"):-len(".h5")]
                save(os.path.join(npy_dir, "data-" + stem + ".npy"), data, version)
                save(os.path.join(npy_dir, "label-" + stem + ".npy"), labels, version)
                # What the reader must see: float32 values, integer classes.
                with h5py.File(os.path.join(h5_dir, file), "w") as f:
                    f["climate/data"] = data.astype(np.float32)
                    f["climate/labels_0"] = labels.astype(np.int64)
        for kind in ("npy", "h5"):
            shutil.copy(os.path.join(src, "stats.h5"), os.path.join(out, name, kind, "stats.h5"))

    # Files to refuse, each the shape of a sample of SRC.
    bad = os.path.join(out, "bad")
    os.makedirs(bad)
    first = sorted(os.listdir(os.path.join(src, "train")))[0]
    with h5py.File(os.path.join(src, "train", first), "r") as f:
        data = f["climate/data"][...]
    np.save(os.path.join(bad, "complex.npy"), data.astype(np.complex64))
    np.save(os.path.join(bad, "int32.npy"), data.astype(np.int32))
    nan = data.copy()
    nan[1, 2, 3] = np.nan
    np.save(os.path.join(bad, "nan.npy"), nan)
    np.save(os.path.join(bad, "float_labels.npy"), np.full(data.shape[:2], 1.5, np.float32))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
