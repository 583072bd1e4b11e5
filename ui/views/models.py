"""Models page: registered and unavailable models, GGUF metadata, estimated memory, running servers."""

from __future__ import annotations

import streamlit as st

from orchestrator.errors import ChorusError
from orchestrator.units import fmt_bytes
from ui.common import chorus

st.title("Models")
rt = chorus()
if rt is None:
    st.stop()

if st.button("Rescan models directory", key="rescan"):
    rt.registry.refresh()

registry = rt.registry
st.caption(f"Models directory: {rt.config.models_dir}")

st.subheader("Registered")
rows = []
for rec in registry.available.values():
    row: dict[str, object] = {"name": rec.name, "file": rec.entry.file or rec.entry.url,
                              "size": fmt_bytes(rec.size_bytes), "mode": rec.mode,
                              "description": rec.entry.description}
    meta = rec.metadata
    if meta is not None:
        row.update({"architecture": meta.architecture, "params": meta.size_label, "quant": meta.quantization,
                    "max ctx": meta.context_length, "layers": meta.block_count})
    try:
        need = None if rec.is_remote else rt.default_need(rec)
    except ChorusError as exc:
        need = None
        row["estimate"] = str(exc)
    if need is not None:
        row.update({"RAM at defaults": fmt_bytes(need.ram_bytes), "VRAM at defaults": fmt_bytes(need.vram_bytes)})
    rows.append(row)
if rows:
    st.dataframe(rows, hide_index=True, width="stretch")
else:
    st.info("No model is registered.")

st.subheader("Unavailable")
if registry.unavailable:
    st.dataframe([{"name": r.name, "file": r.entry.file, "status": r.status, "reason": r.reason}
                  for r in registry.unavailable.values()], hide_index=True, width="stretch")
else:
    st.caption("None: every configured model is usable.")

for name, rec in registry.available.items():
    if rec.metadata is not None:
        with st.expander(f"GGUF metadata: {name}"):
            st.json(rec.metadata.to_summary(), expanded=False)

st.subheader("Running servers")
servers = rt.running_servers()
if not servers:
    st.caption("No llama-server is running.")
for server in servers:
    cols = st.columns([4, 1])
    s = server.spec
    cols[0].markdown(f"**{s.model}** · pid {server.pid} · port {server.port} · n_ctx {s.n_ctx} · "
                     f"slots {s.slots} · ngl {s.n_gpu_layers} · RSS {fmt_bytes(server.rss_bytes())}")
    if cols[1].button("Stop", key=f"stop-{server.pid}"):
        rt.stop_running(server)
        st.rerun()
