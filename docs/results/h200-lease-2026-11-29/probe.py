"""bf16 matmul GFLOP/s on this CPU with the threads given, per call path: why train_throughput's limit (a @ b on
square bf16 tensors) can sit far below what the model's linears reach (AMX)."""
import json, time, torch
import torch.nn.functional as F
def rate(fn, flops, secs=1.0):
    fn(); fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < secs:
        fn(); n += 1
    return round(flops * n / (time.perf_counter() - t) / 1e9, 1)
out = {"threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available()}
for m, k, n in ((2048, 2048, 2048), (4096, 576, 1536), (4096, 1536, 576), (4096, 576, 576)):
    f = 2 * m * k * n
    a = torch.randn(m, k, dtype=torch.bfloat16); b = torch.randn(k, n, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    a32, w32 = a.float(), w.float()
    r = {"matmul_bf16": rate(lambda: a @ b, f), "linear_bf16": rate(lambda: F.linear(a, w), f),
         "linear_fp32": rate(lambda: F.linear(a32, w32), f)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r["linear_autocast_fp32_in"] = rate(lambda: F.linear(a32, w32), f)
    ag = a.clone().requires_grad_(True)
    def fb():
        y = F.linear(ag, w); y.backward(torch.ones_like(y))
    r["linear_bf16_fwd_bwd_input_grad"] = rate(fb, 2 * f)
    with torch.no_grad():
        r["linear_bf16_no_grad"] = rate(lambda: F.linear(a, w), f)
    with torch.inference_mode():
        r["linear_bf16_inference_mode"] = rate(lambda: F.linear(a, w), f)
    out[f"{m}x{k}x{n}"] = r
print(json.dumps(out))
