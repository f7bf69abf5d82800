// The image's own voxels <-> NiiVue's, and the label map <-> NiiVue's drawing bitmap.
//
// NiiVue shows a volume in a RAS-reoriented voxel frame (`permRAS`: axes swapped and flipped to the nearest
// RAS; an oblique volume is shown unrotated) and keeps its drawing bitmap in that frame; positions on screen
// are fractions of it. Everything here goes through that frame, never through millimetres (which differ
// from the image's own for oblique volumes). The label map travels as numpy's C order of shape (z, y, x) =
// NIfTI order, and prompts as the image's own voxel indices (x column, y row, z slice).

/** Which NiiVue slice type (0 axial, 1 coronal, 2 sagittal) shows the volume's own slices (array axis 0). */
export function nativeSliceView(meta) {
  if (meta.spacing.length !== 3) return 0;
  const column = [0, 1, 2].map((r) => Math.abs(meta.direction[r * 3 + 2]));
  const axis = column.indexOf(Math.max(...column)); // 0: left-right, 1: anterior-posterior, 2: foot-head
  return axis === 2 ? 0 : axis === 1 ? 1 : 2;
}

function lookupTables(permRAS, dims) {
  // Same reorientation as NiiVue's loadDrawing: native voxel (x, y, z) -> index in the RAS bitmap.
  const layout = [0, 0, 0];
  for (let i = 0; i < 3; i++) {
    for (let j = 0; j < 3; j++) {
      if (Math.abs(permRAS[i]) - 1 === j) layout[j] = i * Math.sign(permRAS[i]);
    }
  }
  let stride = 1;
  const instride = [1, 1, 1];
  const inflip = [false, false, false];
  for (let i = 0; i < 3; i++) {
    for (let j = 0; j < 3; j++) {
      if (Math.abs(layout[j]) !== i) continue;
      instride[j] = stride;
      if (layout[j] < 0 || Object.is(layout[j], -0)) inflip[j] = true;
      stride *= dims[j + 1];
    }
  }
  return [0, 1, 2].map((a) => {
    const n = dims[a + 1];
    const lut = new Int32Array(n);
    for (let i = 0; i < n; i++) lut[i] = (inflip[a] ? n - 1 - i : i) * instride[a];
    return lut;
  });
}

function reorder(data, permRAS, dims, toRAS) {
  const [xl, yl, zl] = lookupTables(permRAS, dims);
  const out = new Uint8Array(data.length);
  let j = 0;
  for (let z = 0; z < dims[3]; z++) {
    for (let y = 0; y < dims[2]; y++) {
      for (let x = 0; x < dims[1]; x++, j++) {
        const ras = xl[x] + yl[y] + zl[z];
        if (toRAS) out[ras] = data[j];
        else out[j] = data[ras];
      }
    }
  }
  return out;
}

/** The drawing bitmap (RAS order) of a label map in native order. */
export function toBitmap(labels, permRAS, dims) {
  return reorder(labels, permRAS, dims, true);
}

/** The label map in native order of a drawing bitmap (RAS order): the inverse of `toBitmap`. */
export function fromBitmap(bitmap, permRAS, dims) {
  return reorder(bitmap, permRAS, dims, false);
}

/** For each of the image's axes (x, y, z): the RAS-frame axis it runs along, and whether it runs backwards. */
function axisMap(permRAS, dims, dimsRAS) {
  const strides = [1, dimsRAS[1], dimsRAS[1] * dimsRAS[2]];
  const luts = lookupTables(permRAS, dims);
  const map = luts.map((lut, k) => {
    if (dims[k + 1] < 2) return null; // a 2D image's z: the RAS axis left over
    const step = lut[1] - lut[0];
    return { axis: strides.indexOf(Math.abs(step)), flip: step < 0 };
  });
  const used = map.filter(Boolean).map((m) => m.axis);
  return map.map((m) => m || { axis: [0, 1, 2].find((a) => !used.includes(a)), flip: false });
}

/** The image's continuous voxel index [x, y, z] (voxel centres at integers) of a NiiVue fraction. */
export function voxelOfFrac(volume, frac) {
  const { permRAS, dimsRAS } = volume;
  const dims = volume.hdr.dims;
  const ras = [0, 1, 2].map((a) => frac[a] * dimsRAS[a + 1] - 0.5);
  return axisMap(permRAS, dims, dimsRAS).map(({ axis, flip }, k) => (flip ? dims[k + 1] - 1 - ras[axis] : ras[axis]));
}

/** The NiiVue fraction of the image's voxel [x, y, z] (the inverse of `voxelOfFrac`). */
export function fracOfVoxel(volume, voxel) {
  const { permRAS, dimsRAS } = volume;
  const dims = volume.hdr.dims;
  const frac = [0.5, 0.5, 0.5];
  axisMap(permRAS, dims, dimsRAS).forEach(({ axis, flip }, k) => {
    const ras = flip ? dims[k + 1] - 1 - voxel[k] : voxel[k];
    frac[axis] = (ras + 0.5) / dimsRAS[axis + 1];
  });
  return frac;
}
