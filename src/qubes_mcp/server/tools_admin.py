"""Tools that change the set of qubes or their configuration: create, config, devices, remove."""

from __future__ import annotations

from typing import Annotated, Literal, cast

from fastmcp import Context
from pydantic import Field

from qubes_mcp.server import models
from qubes_mcp.server.gateway import Gateway
from qubes_mcp.server.params import (
    DEVICE_PATTERN,
    FEATURE_PATTERN,
    PRINTABLE_PATTERN,
    REVISION_PATTERN,
    Command,
    Label,
    Output,
    PropertyName,
    Qube,
    Stdin,
    StdinBase64,
    Timeout,
    new_name_param,
    qube_param,
)
from qubes_mcp.server.registry import ToolDef

NewName = Annotated[str, new_name_param("starts with your name_prefix")]
Backend = Annotated[str, qube_param("the qube exposing it")]
Device = Annotated[
    str,
    Field(max_length=64, pattern=DEVICE_PATTERN, description="port id"),
]
DevClass = Annotated[Literal["block", "usb"], Field(description=None)]
DispTemplate = Annotated[str, qube_param("")]


def admin_tools(gw: Gateway) -> list[ToolDef]:
    """The create, config, devices and remove groups, bound to ``gw``."""
    table = gw.table

    async def qube_create(
        *,
        template: Annotated[str, qube_param("")],
        name: NewName,
        ctx: Context,
        label: Annotated[Label, Field(description=None)] = "gray",
        disposable_template: Annotated[bool, Field(description=None)] = False,
        private_size: Annotated[
            int | None,
            Field(ge=1, le=1 << 50, description="bytes"),
        ] = None,
        network: Annotated[
            Literal["inherit", "none"],
            Field(description="your egress, or none"),
        ] = "inherit",
    ) -> models.NewQube:
        """Create an app qube (or disposable template) from a template."""
        payload = {
            "name": name,
            "label": label,
            "disposable_template": disposable_template,
            "private_size": private_size,
            "network": network,
        }
        return cast(models.NewQube, await gw.call(ctx, "qube.create", template, payload))

    async def disposable_create(template: DispTemplate, ctx: Context) -> models.NewQube:
        """Create a disposable from a disposable template (remove it when done)."""
        return cast(models.NewQube, await gw.call(ctx, "disposable.create", template))

    async def disposable_run(
        template: DispTemplate,
        command: Command,
        ctx: Context,
        *,
        stdin: Stdin = "",
        stdin_base64: StdinBase64 = "",
        output: Output = "text",
        timeout: Timeout = 60,
    ) -> models.DisposableCommandResult:
        """Run one command as root in a fresh disposable, then destroy it."""
        payload: dict[str, object] = {"command": command, "stdin": stdin, "timeout": timeout}
        if stdin_base64:
            payload["stdin_base64"] = stdin_base64
        if output != "text":
            payload["output"] = output
        return cast(
            models.DisposableCommandResult,
            await gw.call(ctx, "disposable.run", template, payload),
        )

    async def qube_clone(
        qube: Annotated[str, qube_param("")],
        name: NewName,
        ctx: Context,
    ) -> models.NewQube:
        """Clone an app qube."""
        return cast(models.NewQube, await gw.call(ctx, "qube.clone", qube, {"name": name}))

    async def property_set(
        qube: Qube,
        property: PropertyName,
        value: Annotated[
            str | None,
            Field(
                max_length=64,
                description="null: none",
            ),
        ],
        ctx: Context,
    ) -> models.PropertySetResult:
        """Set one allowlisted property of a qube."""
        payload = {"property": property, "value": value}
        return cast(models.PropertySetResult, await gw.call(ctx, "property.set", qube, payload))

    async def feature_set(
        qube: Qube,
        feature: Annotated[str, Field(max_length=64, pattern=FEATURE_PATTERN, description=None)],
        value: Annotated[
            str,
            Field(
                max_length=1024,
                pattern=PRINTABLE_PATTERN,
                description=None,
            ),
        ],
        ctx: Context,
    ) -> models.FeatureSetResult:
        """Set one allowlisted feature of a qube."""
        payload = {"feature": feature, "value": value}
        return cast(models.FeatureSetResult, await gw.call(ctx, "feature.set", qube, payload))

    async def device_attach(
        qube: Annotated[str, qube_param("")],
        backend: Backend,
        device: Device,
        ctx: Context,
        *,
        read_only: Annotated[bool, Field(description="block only")] = False,
        devclass: DevClass = "block",
    ) -> models.DeviceAttachResult:
        """Attach a block or USB device of one qube to another."""
        payload = {
            "backend": backend,
            "device": device,
            "read_only": read_only,
            "devclass": devclass,
        }
        return cast(models.DeviceAttachResult, await gw.call(ctx, "device.attach", qube, payload))

    async def device_detach(
        qube: Annotated[str, qube_param("")],
        backend: Backend,
        device: Device,
        ctx: Context,
        devclass: DevClass = "block",
    ) -> models.DeviceAttachResult:
        """Detach a device from a qube."""
        payload = {"backend": backend, "device": device, "devclass": devclass}
        return cast(models.DeviceAttachResult, await gw.call(ctx, "device.detach", qube, payload))

    async def qube_remove(qube: Qube, ctx: Context) -> models.RemoveResult:
        """Remove a halted qube and its data."""
        return cast(models.RemoveResult, await gw.call(ctx, "qube.remove", qube))

    async def qube_revert(
        qube: Qube,
        ctx: Context,
        revision: Annotated[
            str | None,
            Field(
                max_length=64,
                pattern=REVISION_PATTERN,
                description="a revision id from qube_info's volumes.private.revisions; "
                "null for the newest",
            ),
        ] = None,
    ) -> models.RevertResult:
        """Put a halted qube's private volume back to a revision kept when it last shut
        down. Everything written to its private volume (/rw, /home) since that revision is
        lost. Needs the operator's approval; the qube must be halted."""
        payload = {"revision": revision}
        return cast(models.RevertResult, await gw.call(ctx, "qube.revert", qube, payload))

    return [
        ToolDef(fn, group, table.op(op))
        for op, group, fn in (
            ("qube.create", "create", qube_create),
            ("disposable.create", "create", disposable_create),
            ("disposable.run", "exec", disposable_run),
            ("qube.clone", "create", qube_clone),
            ("property.set", "config", property_set),
            ("feature.set", "config", feature_set),
            ("device.attach", "devices", device_attach),
            ("device.detach", "devices", device_detach),
            ("qube.remove", "remove", qube_remove),
            ("qube.revert", "remove", qube_revert),
        )
    ]
