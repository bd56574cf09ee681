"""Project metadata is stored as `jsonb`, which keeps a number as `numeric` and gives it
back in plain decimal: a float of 2^63 or more (`1e19`, `1.7e308`) comes back as an
integer beyond 64 bits, hundreds of digits long. Such a float is refused like such an
integer (422 `invalid_number`): stored, it made every later title or content change a
500 (the size is re-measured with orjson, which refuses those integers) and every read
hand back ~50 times the bytes the quota counted."""

from __future__ import annotations

from tests.workspace.helpers import app_key, save, saved


class TestHugeFloatsInMetadata:
    async def test_nan_and_infinity_are_refused_not_stored_as_null(self, workspace, new_user_id):
        for literal in (b"NaN", b"Infinity", b"-Infinity"):
            raw = (
                b'{"user_id":"%s","app_source":"penora","title":"t","content":"c",'
                % (new_user_id().encode())
                + b'"metadata":{"a":%s}}' % literal
            )
            r = await workspace.post(
                "/v1/workspace/projects",
                content=raw,
                headers={**app_key(), "content-type": "application/json"},
            )
            assert r.status_code == 422, (literal, r.text)
            (error,) = r.json()["error"]["detail"]["errors"]
            assert error["type"] == "invalid_number", error

    async def test_a_float_that_comes_back_beyond_64_bits_is_refused(self, workspace, new_user_id):
        uid = new_user_id()
        for value in (1e19, -1e19, 9.3e18, 1.7e308):
            r = await save(workspace, uid, metadata={"nested": [{"seed": value}]})
            assert r.status_code == 422, (value, r.text)
            (error,) = r.json()["error"]["detail"]["errors"]
            assert error["type"] == "invalid_number" and error["loc"] == ["body", "metadata"]
        body = await saved(workspace, uid)
        r = await workspace.patch(
            f"/v1/workspace/projects/{body['code']}",
            json={"metadata": {"seed": 1e300}},
            headers=app_key(),
        )
        assert r.status_code == 422, r.text

    async def test_floats_within_64_bits_are_kept_and_the_project_stays_editable(
        self, workspace, new_user_id
    ):
        uid = new_user_id()
        metadata = {"a": 1e18, "b": 2.5, "c": -1e-5, "d": 9.2e18, "e": 0.0}
        body = await saved(workspace, uid, metadata=metadata)
        r = await workspace.patch(
            f"/v1/workspace/projects/{body['code']}", json={"title": "New"}, headers=app_key()
        )
        assert r.status_code == 200, r.text
        assert r.json()["metadata"] == metadata

    async def test_reads_are_not_amplified_past_what_the_quota_counted(
        self, workspace, new_user_id
    ):
        # 1,800 numbers of 6 characters ("1e+300") fit in 16 KB; stored, each came back
        # as 301 digits: a ~540 KB answer to every read of a project counted as ~13 KB.
        uid = new_user_id()
        r = await save(workspace, uid, metadata={"v": [1e300] * 1_800})
        if r.status_code == 201:
            got = await workspace.get(
                f"/v1/workspace/projects/{r.json()['code']}", headers=app_key()
            )
            assert len(got.content) < 20 * r.json()["size_bytes"], (
                f"{len(got.content)} bytes read back, {r.json()['size_bytes']} counted"
            )
        assert r.status_code == 422, r.text[:200]
