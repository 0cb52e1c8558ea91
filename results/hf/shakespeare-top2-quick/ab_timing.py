import torch, time, statistics, sys, json
torch.set_num_threads(1)
from xmoe.hf.session import Session, SessionConfig, Point
from xmoe.hf.routing import routing_state, capture_inputs, set_routing
from xmoe.hf.block import block_family
s = Session(SessionConfig(sys.argv[1], max_tokens=2048, calib_tokens=4096, reference=True))
ref = s.reference; ref.set_experts_implementation("grouped_mm")
ids = s.windows[:8, :-1]
set_routing(s.model, "native")
inputs = capture_inputs(s.model, [ids], ids.numel())
hfb = [m for m in ref.modules() if block_family(m) is not None]
states = {}
for name, p in [("native", Point("native")), ("75% top-2 global", Point("budget", flop_fraction=0.75, candidates=2, per_layer=False)), ("k=1", Point("topk", k=1))]:
    s.apply(p); states[name] = routing_state(s.model)
def setst(st):
    for b, o in zip(s.blocks, st): b.use_routing(**o)
shape = (8, 128, -1)
res = {}
with torch.no_grad():
    for part in ("blocks", "model"):
        names = ["hf grouped_mm"] + list(states)
        t = {n: [] for n in names}
        for r in range(int(sys.argv[2])):
            for n in names[r % len(names):] + names[: r % len(names)]:
                if n.startswith("hf"):
                    fn = (lambda: [b(x.view(shape)) for b, x in zip(hfb, inputs)]) if part == "blocks" else (lambda: ref(input_ids=ids))
                else:
                    setst(states[n])
                    fn = (lambda: [b(x.view(shape)) for b, x in zip(s.blocks, inputs)]) if part == "blocks" else (lambda: s.model(input_ids=ids))
                t0 = time.perf_counter(); fn(); t[n].append(time.perf_counter() - t0)
        for n in names:
            res[f"{part}: {n}"] = statistics.median(t[n][2:]) * 1e3
            print(part, n, round(res[f"{part}: {n}"], 2), "ms")
json.dump(res, open(sys.argv[3], "w"), indent=1)
