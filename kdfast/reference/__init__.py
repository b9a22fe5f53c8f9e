"""The reference backend: readable, differentiable PyTorch, the executable spec.

Each module holds one op under the op's name; autograd does the backward, so the
reference is an independent gradient oracle for every kernel. Functions here receive
inputs already validated by :mod:`kdfast.functional` (2-D, one device, original dtypes)
and return the loss in promote_types(student, teacher, float32). ``kdfast/ops/<op>.py``
registers them with the dispatcher.
"""
