"""Lazy volume access (scripts.volumes): every format in the bundle's (x, y, z) order, with its spacing and errors."""

import h5py
import itk
import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from monai.transforms import LoadImage

from conftest import require_data
from scripts.label_volumes import ZarrLabelWriter, zarr_labels_to_file
from scripts.volumes import open_volume

XYZ = np.random.default_rng(0).integers(0, 255, (12, 10, 4)).astype(np.uint8)  # distinct sizes catch transpositions
ZYX = np.ascontiguousarray(XYZ.transpose(2, 1, 0))
SPACING = (4.0, 5.0, 50.0)
BOX = [[2, 9], [1, 7], [1, 4]]


def _ome_attributes(axes, scale, unit="nanometer"):
    space = {"type": "space", "unit": unit}
    return {
        "multiscales": [
            {
                "axes": [{"name": a, **(space if a in "xyz" else {"type": "channel"})} for a in axes],
                "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
            }
        ]
    }


def _write(kind: str, tmp_path) -> str:
    """Write XYZ in format ``kind`` under tmp_path; return the path to open."""
    if kind == "tiff":
        tifffile.imwrite(tmp_path / "v.tif", ZYX, compression="zlib", rowsperstrip=3)
        return str(tmp_path / "v.tif")
    if kind == "tiff_imagej":
        # ImageJ's units are microns here: the spacing comes back in nm
        metadata = {"spacing": 0.05, "unit": "micron"}
        tifffile.imwrite(tmp_path / "v.tif", ZYX, imagej=True, resolution=(1000 / 4, 1000 / 5), metadata=metadata)
        return str(tmp_path / "v.tif")
    if kind in ("nifti", "nifti_4d"):
        data = XYZ if kind == "nifti" else XYZ[..., None]
        nib.save(nib.Nifti1Image(data, np.diag([*SPACING, 1.0])), tmp_path / "v.nii.gz")
        return str(tmp_path / "v.nii.gz")
    if kind in ("nrrd", "mha"):
        image = itk.image_from_array(ZYX)
        image.SetSpacing(SPACING)
        itk.imwrite(image, str(tmp_path / f"v.{kind}"))
        return str(tmp_path / f"v.{kind}")
    if kind in ("zarr_v2", "zarr_v3"):
        zarr.save_array(tmp_path / "v.zarr", ZYX, zarr_format=int(kind[-1]))
        return str(tmp_path / "v.zarr")
    if kind in ("zarr_key", "zarr_subpath"):
        zarr.open_group(tmp_path / "v.zarr", mode="w").create_array("raw", data=ZYX)
        return str(tmp_path / ("v.zarr:/raw" if kind == "zarr_key" else "v.zarr/raw"))
    if kind == "ome_zarr_v04":  # OME-Zarr 0.4 (Zarr v2), with a channel axis of size 1
        group = zarr.open_group(tmp_path / "v.zarr", mode="w", zarr_format=2)
        group.attrs.update(_ome_attributes("czyx", [1.0, *(s / 1000 for s in SPACING[::-1])], unit="micrometer"))
        group.create_array("0", data=ZYX[None], chunks=(1, 2, 5, 6))
        return str(tmp_path / "v.zarr")
    if kind == "ome_zarr_v05":  # OME-Zarr 0.5 (Zarr v3): metadata under "ome"
        group = zarr.open_group(tmp_path / "v.zarr", mode="w", zarr_format=3)
        group.attrs.update({"ome": {"version": "0.5", **_ome_attributes("zyx", list(SPACING[::-1]))}})
        group.create_array("0", data=ZYX, chunks=(2, 5, 6))
        return str(tmp_path / "v.zarr")
    if kind == "hdf5":
        with h5py.File(tmp_path / "v.h5", "w") as f:
            f.create_dataset("group/raw", data=ZYX, chunks=(2, 5, 6)).attrs["element_size_um"] = [
                s / 1000 for s in SPACING[::-1]
            ]
        return str(tmp_path / "v.h5") + ":/group/raw"
    raise AssertionError(kind)


KNOWN_SPACING = {"tiff_imagej", "nifti", "nifti_4d", "nrrd", "mha", "ome_zarr_v04", "ome_zarr_v05", "hdf5"}


@pytest.mark.parametrize(
    "kind",
    [
        "tiff",
        "tiff_imagej",
        "nifti",
        "nifti_4d",
        "nrrd",
        "mha",
        "zarr_v2",
        "zarr_v3",
        "zarr_key",
        "zarr_subpath",
        "ome_zarr_v04",
        "ome_zarr_v05",
        "hdf5",
    ],
)
def test_format_reads_in_xyz_order_with_spacing(kind, tmp_path):
    with open_volume(_write(kind, tmp_path)) as volume:
        assert volume.shape == XYZ.shape
        assert volume.dtype == np.uint8
        assert volume.spacing == (pytest.approx(SPACING) if kind in KNOWN_SPACING else None)
        np.testing.assert_array_equal(volume.read(BOX), XYZ[2:9, 1:7, 1:4])


def test_spacing_override_rescales_affine(tmp_path):
    volume = open_volume(_write("nifti", tmp_path), spacing=(8, 8, 40))
    assert volume.spacing == (8, 8, 40)
    np.testing.assert_allclose(np.diag(volume.affine), [8, 8, 40, 1])


def test_single_tiff_page_is_a_volume_of_depth_one(tmp_path):
    tifffile.imwrite(tmp_path / "page.tif", ZYX[0])
    volume = open_volume(tmp_path / "page.tif")
    assert volume.shape == (12, 10, 1) and volume.single_section
    np.testing.assert_array_equal(volume.read([[0, 12], [0, 10], [0, 1]])[..., 0], XYZ[..., 0])


def test_isbi_crop_matches_itk():
    (path,) = require_data("isbi2012/images.tif")
    reference = LoadImage(reader="ITKReader", image_only=True)(str(path)).numpy()
    with open_volume(path) as volume:
        assert volume.shape == reference.shape == (512, 512, 20)
        box = [[100, 260], [37, 197], [3, 8]]
        np.testing.assert_array_equal(volume.read(box), reference[100:260, 37:197, 3:8])


def test_errors_name_file_and_key(tmp_path):
    (tmp_path / "notes.txt").write_text("not a volume")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported volume format.*\.zarr"):
        open_volume(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        open_volume(tmp_path / "missing.tif")
    h5_path = _write("hdf5", tmp_path).split(":")[0]
    with pytest.raises(KeyError, match=r"v\.h5: no dataset '/nope'.*/group/raw"):
        open_volume(h5_path + ":/nope")
    with pytest.raises(ValueError, match=r"v\.h5: name the dataset"):
        open_volume(h5_path)
    with h5py.File(tmp_path / "v4.h5", "w") as f:
        f["raw"] = np.zeros((2, 3, 4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"v4\.h5:/raw: dataset of shape \(2, 3, 4, 5\)"):
        open_volume(f"{tmp_path / 'v4.h5'}:/raw")
    zarr.save_array(tmp_path / "v4.zarr", np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"v4\.zarr: Zarr array of shape \(2, 3, 4, 5\)"):
        open_volume(tmp_path / "v4.zarr")
    zarr.open_group(tmp_path / "g.zarr", mode="w").create_array("raw", data=ZYX)
    with pytest.raises(ValueError, match=r"g\.zarr: a Zarr group without OME-Zarr.*'raw'"):
        open_volume(tmp_path / "g.zarr")
    with pytest.raises(FileNotFoundError, match=r"g\.zarr:/nope"):
        open_volume(f"{tmp_path / 'g.zarr'}:/nope")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match=r"rgb\.tif: TIFF image of shape \(8, 9, 3\)"):
        open_volume(tmp_path / "rgb.tif")
    with pytest.raises(ValueError, match=r"box .* does not fit"):
        open_volume(tmp_path / "g.zarr:/raw").read([[0, 13], [0, 10], [0, 4]])


def test_zarr_label_writer_round_trip(tmp_path):
    path = tmp_path / "out_seg.zarr"
    writer = ZarrLabelWriter.create(path, XYZ.shape, (8, 10, 2), SPACING, {"run": {"a": 1}}, uncertainty=True)
    writer.write([[0, 8], [0, 10], [0, 2]], XYZ[:8, :, :2], np.full((8, 10, 2), 0.5))
    writer.write([[8, 12], [0, 10], [2, 4]], XYZ[8:, :, 2:])
    assert [p.name for p in tmp_path.iterdir()] == ["out_seg.zarr"]  # no temporary left behind
    labels = zarr.open_array(path / "labels", mode="r")
    assert labels.shape == ZYX.shape and labels.chunks == (2, 10, 8) and labels.dtype == np.uint8
    reread = open_volume(path)
    assert reread.spacing == SPACING and ZarrLabelWriter(path).attributes["run"] == {"a": 1}
    expected = np.zeros_like(XYZ)
    expected[:8, :, :2], expected[8:, :, 2:] = XYZ[:8, :, :2], XYZ[8:, :, 2:]
    np.testing.assert_array_equal(reread.read([[0, 12], [0, 10], [0, 4]]), expected)
    assert open_volume(f"{path}:/uncertainty").read([[0, 8], [0, 10], [0, 2]]).min() == np.float16(0.5)
    with pytest.raises(FileExistsError):
        ZarrLabelWriter.create(path, XYZ.shape, (8, 10, 2), SPACING, {})


@pytest.mark.parametrize("kind", ["tiff", "nifti"])
def test_zarr_labels_to_file_keeps_the_input_grid(kind, tmp_path):
    source = open_volume(_write(kind, tmp_path))
    labels = (XYZ % 3).astype(np.uint8)
    ZarrLabelWriter.create(tmp_path / "seg.zarr", XYZ.shape, (6, 10, 4), source.spacing, {}).write(
        [[0, 12], [0, 10], [0, 4]], labels
    )
    suffix = ".tif" if kind == "tiff" else ".nii.gz"
    written = zarr_labels_to_file(tmp_path / "seg.zarr", source, tmp_path / f"v_seg{suffix}")
    if kind == "tiff":
        np.testing.assert_array_equal(tifffile.imread(written), labels.transpose(2, 1, 0))
    else:
        image = nib.load(written)
        np.testing.assert_array_equal(np.asarray(image.dataobj), labels)
        np.testing.assert_allclose(image.affine, source.affine)
