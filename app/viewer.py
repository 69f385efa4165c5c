"""The scan viewer: zoom and pan, and the scan beside its map with a live opacity slider.

One ``gr.HTML`` block drawn in the browser: the scan as the model saw it (after
windowing, at display size) and, once a scan is explained, the same scan with one map
over it, side by side. Wheel or the +/- buttons zoom about the pointer, dragging pans,
double-click or Reset goes back to the whole scan; both sides move together, so a region
on the map is the same region on the scan. The opacity slider and the map picker act in
the browser (no request to the server). The map layer is the colour map alone; the
browser blends it over the scan at the slider's opacity.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

ZOOM_MAX = 16.0

TEMPLATE = """
<div class="lv-viewer" data-zoom="1">
  ${value && value.scan ? `
  <div class="lv-tools">
    <button type="button" class="lv-zoom-in" title="Zoom in">+</button>
    <button type="button" class="lv-zoom-out" title="Zoom out">&minus;</button>
    <button type="button" class="lv-reset" title="Whole scan">Reset</button>
    <span class="lv-zoom-label">1.0x</span>
    ${value.layers && value.layers.length ? `
    <label class="lv-tool">Map
      <select class="lv-layer">${value.layers.map((l, i) =>
        `<option value="${i}">${l.name}</option>`).join('')}</select></label>
    <label class="lv-tool">Map opacity
      <input type="range" class="lv-opacity" min="0" max="1" step="0.05"
             value="${value.opacity}"></label>
    <span class="lv-opacity-label">${Math.round(value.opacity * 100)}%</span>` : ''}
    <span class="lv-hint">scroll to zoom, drag to pan, double-click for the whole scan</span>
  </div>
  <div class="lv-panes">
    <figure class="lv-pane lv-scan">
      <div class="lv-stage"><img class="lv-base" src="${value.scan}" alt="scan"
           draggable="false"></div>
      <figcaption>${value.caption}</figcaption>
    </figure>
    ${value.layers && value.layers.length ? `
    <figure class="lv-pane lv-overlay">
      <div class="lv-stage"><img class="lv-base" src="${value.scan}" alt="scan"
           draggable="false">${value.layers.map((l, i) =>
        `<img class="lv-map" data-layer="${i}" src="${l.src}" alt="${l.name}"
              draggable="false" style="opacity: ${value.opacity};
              display: ${i === 0 ? 'block' : 'none'}">`).join('')}</div>
      <figcaption class="lv-map-caption">${value.layers[0].name}</figcaption>
    </figure>` : ''}
  </div>` : `<p class="lv-empty">Upload a scan to see it here.</p>`}
</div>
"""

CSS = """
.lv-viewer { display: flex; flex-direction: column; gap: 6px; }
.lv-tools { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; font-size: 13px; }
.lv-tools button { min-width: 30px; padding: 2px 8px; border-radius: 4px;
  border: 1px solid var(--border-color-primary); background: var(--button-secondary-background-fill); }
.lv-tool { display: inline-flex; align-items: center; gap: 4px; min-width: 0; }
.lv-layer { max-width: 240px; font-size: 13px; padding: 1px 4px; }
.lv-hint { color: var(--body-text-color-subdued); }
.lv-panes { display: flex; gap: 8px; }
.lv-pane { flex: 1 1 0; margin: 0; min-width: 0; }
.lv-pane { position: relative; height: 340px; overflow: hidden; background: #000;
  border-radius: 4px; cursor: grab; touch-action: none; }
.lv-pane.lv-dragging { cursor: grabbing; }
.lv-stage { position: absolute; inset: 0 0 22px 0; transform-origin: 0 0; }
.lv-stage img { position: absolute; inset: 0; width: 100%; height: 100%;
  object-fit: contain; user-select: none; pointer-events: none; image-rendering: auto; }
.lv-pane figcaption { position: absolute; left: 0; right: 0; bottom: 0; height: 22px;
  font-size: 12px; line-height: 22px; padding: 0 6px; color: #eee; background: #111;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.lv-empty { color: var(--body-text-color-subdued); }
"""

# Runs once per page; every listener hangs on ``element`` (which outlives re-renders of
# its content), and the zoom state lives on it too.
JS = """
const state = { s: 1, x: 0, y: 0, drag: null };
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
function apply() {
  const pane = element.querySelector('.lv-pane');
  if (pane) {
    const w = pane.clientWidth, h = pane.clientHeight;
    state.x = clamp(state.x, w * (1 - state.s), 0);
    state.y = clamp(state.y, h * (1 - state.s), 0);
  }
  element.querySelectorAll('.lv-stage').forEach(st => {
    st.style.transform = `translate(${state.x}px, ${state.y}px) scale(${state.s})`;
  });
  const root = element.querySelector('.lv-viewer');
  if (root) root.dataset.zoom = state.s.toFixed(2);
  const label = element.querySelector('.lv-zoom-label');
  if (label) label.textContent = state.s.toFixed(1) + 'x';
}
function zoomAt(factor, cx, cy) {
  const s = clamp(state.s * factor, 1, ZOOM_MAX);
  state.x = cx - (cx - state.x) * s / state.s;
  state.y = cy - (cy - state.y) * s / state.s;
  state.s = s;
  apply();
}
function centre() {
  const pane = element.querySelector('.lv-pane');
  return pane ? [pane.clientWidth / 2, pane.clientHeight / 2] : [0, 0];
}
function reset() { state.s = 1; state.x = 0; state.y = 0; apply(); }
element.addEventListener('wheel', e => {
  const pane = e.target.closest('.lv-pane');
  if (!pane) return;
  e.preventDefault();
  const r = pane.getBoundingClientRect();
  zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
}, { passive: false });
element.addEventListener('pointerdown', e => {
  const pane = e.target.closest('.lv-pane');
  if (!pane) return;
  state.drag = { px: e.clientX, py: e.clientY, x: state.x, y: state.y, pane };
  pane.classList.add('lv-dragging');
  pane.setPointerCapture(e.pointerId);
});
element.addEventListener('pointermove', e => {
  if (!state.drag) return;
  state.x = state.drag.x + e.clientX - state.drag.px;
  state.y = state.drag.y + e.clientY - state.drag.py;
  apply();
});
const endDrag = () => {
  if (state.drag) state.drag.pane.classList.remove('lv-dragging');
  state.drag = null;
};
element.addEventListener('pointerup', endDrag);
element.addEventListener('pointercancel', endDrag);
element.addEventListener('dblclick', e => { if (e.target.closest('.lv-pane')) reset(); });
element.addEventListener('click', e => {
  if (e.target.closest('.lv-zoom-in')) zoomAt(1.5, ...centre());
  else if (e.target.closest('.lv-zoom-out')) zoomAt(1 / 1.5, ...centre());
  else if (e.target.closest('.lv-reset')) reset();
});
element.addEventListener('input', e => {
  if (e.target.classList.contains('lv-opacity')) {
    const v = parseFloat(e.target.value);
    element.querySelectorAll('.lv-map').forEach(m => { m.style.opacity = v; });
    const label = element.querySelector('.lv-opacity-label');
    if (label) label.textContent = Math.round(v * 100) + '%';
  }
});
element.addEventListener('change', e => {
  if (e.target.classList.contains('lv-layer')) {
    const pick = e.target.value;
    let name = '';
    element.querySelectorAll('.lv-map').forEach(m => {
      const on = m.dataset.layer === pick;
      m.style.display = on ? 'block' : 'none';
      if (on) name = m.alt;
    });
    const cap = element.querySelector('.lv-map-caption');
    if (cap) cap.textContent = name;
  }
});
// A new scan or map starts from the whole scan.
new MutationObserver(() => {
  if (!element.querySelector('.lv-stage')) return;
  const stage = element.querySelector('.lv-stage');
  if (!stage.style.transform) reset();
}).observe(element, { childList: true, subtree: true });
""".replace("ZOOM_MAX", repr(ZOOM_MAX))


def png_data_url(image: np.ndarray) -> str:
    """A (H, W) or (H, W, 3) uint8 image as a ``data:image/png`` URL (light compression)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def viewer_value(scan: np.ndarray, caption: str,
                 layers: list[tuple[str, np.ndarray]] | None = None,
                 opacity: float = 0.5) -> dict[str, Any]:
    """What the viewer shows.

    Args:
        scan: the scan as shown, (H, W) uint8 at display size.
        caption: the scan's line under it (e.g. its name and window).
        layers: (name, (H, W, 3) uint8 colour map alone, same size as ``scan``) per map.
        opacity: the slider's starting value.

    Returns:
        The ``gr.HTML`` value: data URLs, names and the opacity.
    """
    for name, layer in layers or []:
        if layer.shape[:2] != scan.shape[:2]:
            raise ValueError(f"map {name!r} is {layer.shape[:2]}, the scan {scan.shape[:2]}")
    # Names and captions go into the page as HTML: file names and class labels are the
    # user's text, so they are escaped here.
    return {"scan": png_data_url(scan), "caption": html.escape(caption),
            "layers": [{"name": html.escape(name), "src": png_data_url(layer)}
                       for name, layer in layers or []],
            "opacity": float(np.clip(opacity, 0.0, 1.0))}


def build_viewer(**kwargs: Any) -> Any:
    """The viewer block (empty until a scan is shown)."""
    import gradio as gr

    return gr.HTML(value=None, html_template=TEMPLATE, css_template=CSS, js_on_load=JS,
                   **kwargs)
