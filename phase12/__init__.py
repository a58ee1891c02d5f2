"""Phase 12: pure-functional MAML on torch.func with an exactly twice-differentiable
fused attention. The command line is phase12.cli; the engine's modules are listed in
the README ("How the code is laid out")."""
