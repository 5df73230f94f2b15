"""int64 -> bfloat16 on CUDA: PyTorch's eager kernels against inductor's compiled ones.

``python -m benchmarks.int64_to_bf16_check``: how many of 2^24 random integers below 2^40 (grid values
of ``revnet_zero.conversion.grid``) convert to different bfloat16 values compiled and eagerly. Why
``from_grid`` runs eagerly after the compiled grid step."""
import torch


def main() -> None:
    torch.manual_seed(0)
    X = torch.randint(-2 ** 40, 2 ** 40, (1 << 24,), device="cuda")
    eager = X.to(torch.bfloat16)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("eager direct vs eager via float32: differ in", (eager != X.to(torch.float32).to(torch.bfloat16)).sum().item())
    emulate = {"emulate_precision_casts": True}
    cases = {"compiled direct, emulate_precision_casts": (lambda t: t.to(torch.bfloat16), emulate),
             "compiled via float32, emulate_precision_casts": (lambda t: t.to(torch.float32).to(torch.bfloat16), emulate),
             "compiled direct": (lambda t: t.to(torch.bfloat16), {})}
    for name, (fn, options) in cases.items():
        out = torch.compile(fn, fullgraph=True, options=options)(X)
        print(f"{name}: differs from eager in {(out != eager).sum().item()} of {X.numel()}")


if __name__ == "__main__":
    main()
