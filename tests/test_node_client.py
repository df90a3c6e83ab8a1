"""The contract ships whole: a Node.js client (@grpc/grpc-js, @grpc/proto-loader, protobufjs;
tests/node) built from nothing but the repository's proto/ folder calls the server on
127.0.0.1 and decodes the google.rpc.Status / ErrorInfo details with the shipped
proto/google/rpc files. `make test` installs its packages (npm ci, from the committed
package-lock.json); without node or npm on the machine this test skips and says so."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import pytest

from server.app import RunningService
from tests.helpers import REPO

NODE_DIR = REPO / "tests" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with tests/node's packages installed (npm ci when missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the Node.js client test cannot run")
    if not (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=600,
        )
    return node


async def test_node_client_decodes_error_details_from_the_shipped_protos(
    service: RunningService, node: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / "decode_errors.js"),
        f"127.0.0.1:{service.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    results = [json.loads(line) for line in out.decode().splitlines()]
    imported, no_user, no_items, bad_token, not_found = results
    assert imported["code"] == "OK"
    assert imported["response"]["results"][0]["code"] == "RESULT_CODE_OK"

    def info(result: dict[str, object]) -> tuple[str, str, dict[str, str], str]:
        details = result["details"]
        assert isinstance(details, dict)
        (one,) = details["infos"]
        return one["reason"], one["domain"], one["metadata"], details["message"]

    assert no_user["code"] == "INVALID_ARGUMENT"
    assert info(no_user) == (
        "INVALID_USER_ID",
        "follow.v1",
        {"field": "user_id"},
        "user_id: user id is empty",
    )
    assert no_items["code"] == "INVALID_ARGUMENT"
    assert info(no_items)[:3] == ("MISSING_ITEMS", "follow.v1", {"field": "target_ids"})
    assert bad_token["code"] == "INVALID_ARGUMENT"
    reason, _, metadata, message = info(bad_token)
    assert (reason, metadata) == ("INVALID_PAGE_TOKEN", {"field": "page_token"})
    assert message.startswith("page_token: ")
    assert not_found["code"] == "NOT_FOUND"
    assert info(not_found)[:3] == ("USER_NOT_FOUND", "follow.v1", {"field": "user_id"})
