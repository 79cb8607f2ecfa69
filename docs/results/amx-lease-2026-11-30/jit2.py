"""bf16/fp32 F.linear forward + input-gradient, (M x 576)·(576 x 1536), each case warmed up on its own shapes first,
the aligned case first this time. Prints ms per call."""
import json, time, torch
import torch.nn.functional as F
torch.set_num_threads(2)
for dtype in (torch.bfloat16, torch.float32):
    w = torch.randn(1536, 576, dtype=dtype)
    res = {}
    for label, ms in (("M_multiple_of_64", [640, 704, 768] * 20), ("fixed_M_700", [700] * 60),
                      ("M_multiple_of_16", [624, 688, 752] * 20), ("new_M_each_call", list(range(700, 760)))):
        for m in sorted(set(ms))[:3]:  # warm-up: the first shapes of the case
            x = torch.randn(m, 576, dtype=dtype, requires_grad=True); F.linear(x, w).sum().backward()
        xs = [torch.randn(m, 576, dtype=dtype, requires_grad=True) for m in ms]
        start = time.perf_counter()
        for x in xs:
            F.linear(x, w).sum().backward()
        sec = time.perf_counter() - start
        res[label] = {"ms_per_call": round(sec / len(xs) * 1e3, 3), "us_per_row": round(sec / sum(ms) * 1e6, 3)}
    print(json.dumps({"dtype": str(dtype), **res}))
