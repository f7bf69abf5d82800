// The workbench's HTTP API (see medseg.server.app): JSON calls, the mask encoding, NPY uploads.

const token = new URLSearchParams(location.search).get("token") || sessionStorage.getItem("medseg-token") || "";
if (token) sessionStorage.setItem("medseg-token", token);

function headers(extra = {}) {
  return token ? { Authorization: `Bearer ${token}`, ...extra } : extra;
}

export class ApiError extends Error {}

/** A URL for a plain link (a download): the token travels as ?token=. */
export function linkTo(path) {
  return token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : path;
}

async function check(response) {
  if (response.ok) return response;
  let detail = `${response.status} ${response.statusText}`;
  try {
    detail = (await response.json()).detail || detail;
  } catch {
    // not JSON: keep the status line
  }
  throw new ApiError(detail);
}

async function call(path, init) {
  try {
    return await fetch(path, init);
  } catch {
    throw new ApiError("the medseg server does not answer (stopped?): start it again and reload the page");
  }
}

export async function getJSON(path) {
  return (await check(await call(path, { headers: headers() }))).json();
}

export async function getBytes(path) {
  const response = await check(await call(path, { headers: headers() }));
  return { buffer: await response.arrayBuffer(), headers: response.headers };
}

export async function send(method, path, body) {
  const init = { method, headers: headers({ "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await check(await call(path, init));
  return response.status === 204 ? null : response.json();
}

export async function sendBytes(method, path, bytes) {
  const init = { method, headers: headers({ "Content-Type": "application/octet-stream" }), body: bytes };
  return (await check(await call(path, init))).json();
}

/** A mask response's label map (zlib + base64 of uint8 in C order) as a Uint8Array. */
export async function decodeLabels(mask) {
  const raw = Uint8Array.from(atob(mask.labels), (c) => c.charCodeAt(0));
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** NPY bytes (version 1.0, uint8, C order) of a label map of numpy `shape`. */
export function npyBytes(labels, shape) {
  let header = `{'descr': '|u1', 'fortran_order': False, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
  const unpadded = 10 + header.length + 1;
  header += " ".repeat((64 - (unpadded % 64)) % 64) + "\n";
  const out = new Uint8Array(10 + header.length + labels.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 255, header.length >> 8]);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(labels, 10 + header.length);
  return out;
}
