// Voxel <-> world coordinates, and the label map <-> NiiVue drawing bitmap.
//
// The server describes an image in ITK order (x first): spacing (mm), origin (mm), direction (row-major),
// all in LPS. NiiVue reports positions in RAS millimetres and keeps its drawing bitmap in a RAS-reoriented
// voxel order (`permRAS`). The label map travels as numpy's C order of shape (z, y, x) = NIfTI order.

/** Continuous voxel index [x, y, z] (voxel centres at integers) of a NiiVue RAS mm position. */
export function mmToVoxel(meta, mm) {
  const n = meta.spacing.length; // 2 for 2D images, 3 for volumes
  const lps = [-mm[0], -mm[1], mm[2]];
  const d = [lps[0] - meta.origin[0], lps[1] - meta.origin[1], (n === 3 ? lps[2] - meta.origin[2] : 0)];
  // index = (D S)^-1 (p - origin), D orthonormal: D^-1 = D^T
  const out = [0, 0, 0];
  for (let i = 0; i < n; i++) {
    let dot = 0;
    for (let r = 0; r < n; r++) dot += meta.direction[r * n + i] * d[r];
    out[i] = dot / meta.spacing[i];
  }
  return out;
}

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

/** NiiVue RAS mm position of a continuous voxel index [x, y, z] (the inverse of `mmToVoxel`). */
export function voxelToMm(meta, voxel) {
  const n = meta.spacing.length;
  const lps = [0, 0, 0];
  for (let r = 0; r < n; r++) {
    let sum = meta.origin[r];
    for (let i = 0; i < n; i++) sum += meta.direction[r * n + i] * meta.spacing[i] * voxel[i];
    lps[r] = sum;
  }
  return [-lps[0], -lps[1], lps[2]];
}
