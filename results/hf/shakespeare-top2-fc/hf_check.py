"""Plain transformers on an `xmoe export-hf` folder: logits and NLL vs the xmoe run on val
tokens, greedy generation vs xmoe's KV-cached generate, and one sample.

usage: python hf_check.py RUN_DIR EXPORT_DIR OUT.json
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from xmoe.train.run_dir import load_run

torch.set_num_threads(1)
run_dir, export_dir, out_path = sys.argv[1:4]
run = load_run(run_dir)
gpt = run.model.eval()
hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(export_dir)
T = gpt.cfg.block_size
val = torch.from_numpy(run.data.val[: 16 * T + 1].astype("int64"))
x, y = val[:-1].view(16, T), val[1:].view(16, T)
with torch.no_grad():
    a, b = gpt(x).logits.float(), hf(input_ids=x).logits.float()
    nll = [float(torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten())) for z in (a, b)]
    prompt = tok("ROMEO.\n", return_tensors="pt")["input_ids"]
    same_ids = prompt.tolist() == [run.data.tokenizer.encode("ROMEO.\n").ids]
    g_hf = hf.generate(input_ids=prompt, max_new_tokens=40, do_sample=False)
    g_x = gpt.generate(prompt, 40, top_k=1)
    torch.manual_seed(0)
    s = hf.generate(input_ids=prompt, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=50)
res = {
    "tokens": x.numel(),
    "max_abs_logit_diff": float((a - b).abs().max()),
    "max_abs_logit": float(a.abs().max()),
    "nll_xmoe": nll[0],
    "nll_transformers": nll[1],
    "tokenizer_ids_equal": same_ids,
    "greedy_equal": g_hf.tolist() == g_x.tolist(),
    "greedy_text": tok.decode(g_hf[0]),
    "sample_text": tok.decode(s[0]),
    "tokenizer_class": type(tok).__name__,
    "model_class": type(hf).__name__,
}
print(json.dumps(res, indent=1))
with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
