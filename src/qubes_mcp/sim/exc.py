"""The emulated qubesd's exception hierarchy.

Class names are wire names: a ``QubesException`` travels to the client as
``2\\0<ClassName>\\0\\0<str(exc)>\\0``, and the client looks the class up by that name. Keep the
names, the base classes and the default messages exactly as qubesd R4.3 has them
(``qubes/exc.py``): a client catches ``QubesVMNotFoundError`` because it is a ``KeyError``, and
R4.3 sends nothing at all for the classes outside ``QubesException`` (see ``is_reported``).
"""

from __future__ import annotations


class QubesException(Exception):  # noqa: N818 - wire name
    """Exception that can be shown to the user."""


class _KeyErrorStr:
    """``KeyError`` quotes its message in ``str()``; qubesd undoes that for these classes."""

    def __str__(self) -> str:
        return QubesException.__str__(self)  # type: ignore[arg-type]


class QubesVMNotFoundError(_KeyErrorStr, QubesException, KeyError):
    def __init__(self, vmname: str) -> None:
        super().__init__(f"No such domain: {vmname!r}")
        self.vmname = vmname


class QubesVMInvalidUUIDError(QubesException):
    def __init__(self, uuid: str) -> None:
        super().__init__(f"VM UUID is not valid: {uuid!r}")


class QubesVMError(QubesException):
    """Some problem with domain state."""

    def __init__(self, vmname: str, msg: str) -> None:
        super().__init__(msg)
        self.vmname = vmname


class QubesVMInUseError(QubesVMError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Domain is in use: {vmname!r}")


class QubesVMNotStartedError(QubesVMError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Domain is powered off: {vmname!r}")


class QubesVMNotRunningError(QubesVMNotStartedError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(
            vmname, msg or f"Domain not running (either powered off or paused): {vmname!r}"
        )


class QubesVMNotPausedError(QubesVMNotStartedError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Domain is not paused: {vmname!r}")


class QubesVMNotSuspendedError(QubesVMError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Domain is not suspended: {vmname!r}")


class QubesVMNotHaltedError(QubesVMError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Domain is not powered off: {vmname!r}")


class QubesVMShutdownTimeoutError(QubesVMError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Domain shutdown timed out: {vmname!r}")


class QubesNoTemplateError(QubesVMError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Template for the domain {vmname!r} not found")


class QubesMemoryError(QubesVMError, MemoryError):
    def __init__(self, vmname: str, msg: str | None = None) -> None:
        super().__init__(vmname, msg or f"Not enough memory to start domain {vmname!r}")


class QubesPoolInUseError(QubesException):
    def __init__(self, pool: str, msg: str | None = None) -> None:
        super().__init__(msg or f"Storage pool is in use: {pool!r}")


class QubesValueError(QubesException, ValueError):
    """Cannot set some value, because it is invalid, out of bounds, etc."""


class QubesPropertyValueError(QubesValueError):
    def __init__(self, holder: str, prop: str, value: object, msg: str | None = None) -> None:
        super().__init__(msg or f"Invalid value {value!r} for property {prop!r} of {holder!r}")


class QubesNoSuchPropertyError(QubesException, AttributeError):
    def __init__(self, holder: str, prop_name: str, msg: str | None = None) -> None:
        super().__init__(msg or f"Invalid property {prop_name!r} of {holder!s}")


class QubesNotImplementedError(QubesException, NotImplementedError):
    def __init__(self, msg: str | None = None) -> None:
        super().__init__(msg or "This feature is not available")


class QubesFeatureNotFoundError(_KeyErrorStr, QubesException, KeyError):
    def __init__(self, domain: str, feature: str) -> None:
        super().__init__(f"Feature not set for domain {domain}: {feature}")


class QubesTagNotFoundError(_KeyErrorStr, QubesException, KeyError):
    def __init__(self, domain: str, tag: str) -> None:
        super().__init__(f"Tag not set for domain {domain}: {tag}")


class QubesLabelNotFoundError(_KeyErrorStr, QubesException, KeyError):
    def __init__(self, label: str) -> None:
        super().__init__(f"Label does not exist: {label}")


# Device errors are KeyError/ValueError subclasses *without* the str() fix: qubesd sends
# str(exc), which for a KeyError is the repr of the message (quoted). Kept on purpose.
class DeviceNotAssigned(QubesException, KeyError):  # noqa: N818 - wire name
    """Trying to unassign a device that is not assigned."""


class DeviceNotFound(QubesException, KeyError):  # noqa: N818 - wire name
    """Non-existing device."""


class DeviceAlreadyAttached(QubesException, KeyError):  # noqa: N818 - wire name
    """Trying to attach an already attached device."""


class DeviceAlreadyAssigned(QubesException, KeyError):  # noqa: N818 - wire name
    """Trying to assign an already assigned device."""


class UnrecognizedDevice(QubesException, ValueError):  # noqa: N818 - wire name
    """Device identity is not as expected."""


class UnexpectedDeviceProperty(QubesException, ValueError):  # noqa: N818 - wire name
    """Device has unexpected property such as backend_domain, devclass etc."""


class StoragePoolException(QubesException):
    """A general storage exception."""


# --- Not QubesException: on R4.3 these never reach the client (zero-byte reply). ---


class ProtocolError(AssertionError):
    """Something is wrong with the data received."""


class PermissionDenied(Exception):  # noqa: N818 - wire name
    """Raised deliberately by handlers when qubesd decides not to cooperate."""


def is_reported(exc: BaseException) -> bool:
    """Whether R4.3 qubesd sends ``exc`` to the client (only ``QubesException`` subclasses);
    everything else is logged and the connection is aborted with zero bytes."""
    return isinstance(exc, QubesException)
