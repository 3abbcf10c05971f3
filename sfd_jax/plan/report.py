"""The plan for the terminal: a few lines per program, one line per layout of a search."""
from __future__ import annotations


def _gb(x) -> str:
  return "?" if x is None else f"{x / 1e9:.2f} GB"


def _duration(seconds: float) -> str:
  if seconds >= 86400:
    return f"{seconds / 86400:.1f} days"
  if seconds >= 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds:.0f} s"


def format_program(name: str, p: dict) -> str:
  """A few lines per program for the terminal."""
  if not p["compiled"]:
    return (f"{name}: does NOT fit ({_gb(p['hbm_per_chip_bytes'])} needed per chip, {_gb(p['hbm_usable_bytes'])} "
            f"usable) [compile {p['compile_s']:.0f} s]\n  {p['error']}")
  h = p["hbm"]
  lines = [
      f"{name}: {p['note']}" if p.get("note") else f"{name}:",
      f"  HBM per chip {_gb(p['hbm_per_chip_bytes'])} of {_gb(p['hbm_usable_bytes'])} usable: "
      f"{'fits' if p['fits'] else 'does NOT fit'} (arguments {_gb(h['arguments'])}, outputs {_gb(h['outputs'])}, "
      f"aliased {_gb(h['aliases'])}, temporaries {_gb(h['temporaries'])})",
      f"  per chip: {p['flops_per_chip'] / 1e12:.3f} TFLOP (model {p['model_flops_per_chip'] / 1e12:.3f}), "
      f"{p['hbm_traffic_bytes_per_chip'] / 1e9:.2f} GB HBM traffic, "
      f"{p['collective_bytes_received_per_chip'] / 1e9:.3f} GB received over ICI in "
      + (", ".join(f"{int(c['count'])} {k}" for k, c in sorted(p["collectives"].items())) or "no collectives")
      + (f", {p['dcn_bytes_received_per_chip'] / 1e9:.3f} GB over DCN in "
         + ", ".join(f"{int(c['count'])} {k}" for k, c in sorted(p["dcn"].items())) if p["dcn"] else ""),
      f"  bound {p['step_time_bound_s'] * 1e3:.2f} ms ({p['bound_by']}; compute {p['time_s']['compute'] * 1e3:.2f}, "
      f"HBM {p['time_s']['hbm'] * 1e3:.2f}, ICI {p['time_s']['ici'] * 1e3:.2f}"
      + (f", DCN {p['time_s']['dcn'] * 1e3:.2f}" if p["dcn"] else "")
      + f" ms): MFU ≤ {100 * p['mfu_bound']:.1f}%, "
      f"≤ {p['images_per_s_per_chip']:.1f} images/s per chip" + (
          f", {p['full_run']} ≥ {_duration(p['full_run_s'])}" if p.get("full_run_s") else "")
      + f" [compile {p['compile_s']:.0f} s]",
  ]
  uncounted = _not_counted(p)
  if uncounted:
    lines.append(f"  NOT COUNTED: {len(uncounted)} while loop(s) whose trip count the HLO does not show "
                 f"({'; '.join(uncounted)}): FLOPs, bytes and collectives count one iteration of each, so the "
                 "bound above is too low")
  return "\n".join(lines)


def _not_counted(p: dict) -> list[str]:
  """The loops of a compiled program whose iterations its costs leave out."""
  return p.get("loops", {}).get("not_counted", [])


def format_candidate(e: dict) -> str:
  """One line per layout of a search."""
  head = f"data {e['data']:>3} × fsdp {e['fsdp']:<3} {e['remat_policy']:<32} accum {e['grad_accum_steps']}"
  if not e["compiled"]:
    return f"{head}: does not fit ({_gb(e.get('hbm_per_chip_bytes'))}) [compile {e['compile_s']:.0f} s]"
  return (f"{head}: {_gb(e['hbm_per_chip_bytes'])} {'fits' if e['fits'] else 'does NOT fit'}, bound "
          f"{e['step_time_bound_s'] * 1e3:.1f} ms ({e['bound_by']}), MFU ≤ {100 * e['mfu_bound']:.1f}% "
          f"[compile {e['compile_s']:.0f} s]"
          + (f"; {len(_not_counted(e))} loop(s) NOT COUNTED: bound too low" if _not_counted(e) else ""))
