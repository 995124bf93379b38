"""static / old LayerAware / new LayerAware on every case; writes /tmp/pol/final_key.json."""
import sys, json, time, importlib.util
from eval import *
spec = importlib.util.spec_from_file_location("cache_orig", "/tmp/pol/cache_orig.py")
orig = importlib.util.module_from_spec(spec); spec.loader.exec_module(orig)
EXTRA["old_layer"] = lambda S_, layers, E, k: orig.LayerAware(layers)
rows = []
for name, t, s, ev in cases():
    r = {p: round(rate(t, p, s, ev), 4) for p in ("static", "old_layer", "layer")}
    rows.append((name, r))
    print(f"{name:36s}", "  ".join(f"{p}={v:.4f}" for p, v in r.items()), flush=True)
json.dump(rows, open("/tmp/pol/final_key.json", "w"))
