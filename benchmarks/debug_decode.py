import os, sys, traceback
sys.path.insert(0, "tests")
from pathlib import Path
import tempfile
import torch
from checkpoints import make_checkpoint
from moetier import LLM, SamplingParams
d = Path(tempfile.mkdtemp()); make_checkpoint("qwen3_moe", d)
dtype = sys.argv[1]; graphs = sys.argv[2] == "1"
try:
    llm = LLM(str(d), dtype=dtype, device="cuda", max_model_len=128, max_num_seqs=4, cuda_graphs=graphs)
    print("sync_free", llm.engine.executor.sync_free, "graphs", llm.engine.runner.graphs is not None)
    out = llm.generate([[5, 6, 7], list(range(10, 40))], SamplingParams(max_tokens=8, ignore_eos=True))
    print("OK", dtype, graphs, os.environ.get("MOETIER_COMPILE"), [o.token_ids for o in out])
except Exception:
    print("FAIL", dtype, graphs, os.environ.get("MOETIER_COMPILE"))
    traceback.print_exc(limit=-6)
