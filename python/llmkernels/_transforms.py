"""Whether a torch.func transform is running the current call (shared by the ops, which then
take the reference path, and the reference code, which then avoids in-place writes)."""
import torch

try:  # (None: never inside a transform)
    _peek_interpreter = torch._C._functorch.peek_interpreter_stack
except AttributeError:  # pragma: no cover
    _peek_interpreter = None


def functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, jvp, ...) is running this call.
    Never while torch.compile traces: dynamo cannot trace the question (and compile's own
    functionalization answered yes), so torch.compile around torch.func.grad of our ops
    still fails with torch's setup_context error."""
    return (_peek_interpreter is not None and _peek_interpreter() is not None
            and not torch.compiler.is_compiling())
