"""What kvcompile raises and warns with (both importable from `kvcompile`)."""


class KVQuantOptionError(ValueError):
    """An option of the kvquant backend, or its fit to a model's layer, is wrong; the message names the
    option, the value and the valid ones."""


class KVQuantWarning(UserWarning):
    """Something was left in full precision, or runs another way than asked (the message says what and
    why); results stay correct."""
