"""Identity from a site's identity provider: per issuer, the subject from a chosen claim and the
tenant from another claim, a claim value table or a fixed tenant; a group claim grants nothing."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from control.pki import DevPki, ensure_dev_pki
from gateway.auth.identity import JwtVerifier
from gateway.config import AuthConfig, ConfigError, IssuerConfig, load
from tests.gateway.test_identity import claims, refused, sign


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("idp"))


def verifier(pki: DevPki, speaks: Any = lambda issuer, tenant: True, **issuer: Any) -> JwtVerifier:
    auth = AuthConfig(issuers=(IssuerConfig(issuer="airlock-dev", **issuer),))
    return JwtVerifier(
        auth, {"airlock-dev": pki.jwks}, speaks, known_tenant=lambda t: t in ("acme", "globex")
    )


def test_subject_and_tenant_from_an_idps_claims_through_a_table(pki: DevPki) -> None:
    v = verifier(pki, subject_claim="email", tenant_claim="org.id", tenant_map=(("org-123", "acme"),))
    token = sign(pki, claims(sub="00u1abc", tenant=None, email="bob@example.com", org={"id": "org-123"}))
    principal = v.verify(token)
    assert (principal.subject, principal.tenant, principal.policy_subject) == (
        "bob@example.com", "acme", "acme/bob@example.com",
    )  # fmt: skip
    err = refused(
        v, sign(pki, claims(tenant=None, email="b@x", org={"id": "org-999"})), "TOKEN_TENANT_UNMAPPED"
    )
    assert "org-999" not in err.message  # the IdP's value is never repeated
    refused(v, sign(pki, claims(tenant=None, org={"id": "org-123"})), "TOKEN_CLAIM_MISSING")  # no email
    refused(v, sign(pki, claims(tenant="acme", email="b@x")), "TOKEN_CLAIM_MISSING")  # no org.id


def test_a_claim_name_with_dots_is_read_whole_first(pki: DevPki) -> None:
    v = verifier(pki, tenant_claim="https://example.com/tenant")
    token = sign(pki, claims(tenant=None, **{"https://example.com/tenant": "globex"}))
    assert v.verify(token).tenant == "globex"


def test_a_fixed_tenant_ignores_what_the_token_says(pki: DevPki) -> None:
    v = verifier(pki, tenant="acme")
    assert v.verify(sign(pki, claims(tenant="globex"))).tenant == "acme"
    assert v.verify(sign(pki, claims(tenant=None))).tenant == "acme"


def test_the_policy_still_decides_which_issuer_speaks_for_the_mapped_tenant(pki: DevPki) -> None:
    v = verifier(
        pki, lambda issuer, tenant: tenant == "globex", tenant_map=(("o1", "acme"),), tenant_claim="org"
    )
    refused(v, sign(pki, claims(tenant=None, org="o1")), "TOKEN_ISSUER_NOT_ALLOWED")


def test_an_unmapped_claim_value_must_be_a_lowercase_tenant_name(pki: DevPki) -> None:
    v = verifier(pki)
    err = refused(v, sign(pki, claims(tenant="ACME")), "TOKEN_CLAIM_INVALID")
    assert "lowercase" in err.message


def test_a_tenant_nobody_serves_is_named(pki: DevPki) -> None:
    v = verifier(pki, lambda issuer, tenant: tenant == "acme")
    err = refused(v, sign(pki, claims(tenant="acmee")), "TOKEN_TENANT_UNKNOWN")
    assert err.message == "tenant 'acmee' is not served here"


def test_group_and_role_claims_grant_nothing(pki: DevPki) -> None:
    v = verifier(pki)
    principal = v.verify(sign(pki, claims(roles=["tenant-admin"], groups=["admins"])))
    assert principal.roles == ("tenant-admin",)  # recorded (audited) only; policy.csv's g lines grant roles


def config(tmp_path: Path, issuer: str) -> Path:
    path = tmp_path / "airlock.toml"
    path.write_text(
        textwrap.dedent(f"""
        [[auth.issuers]]
        issuer = "https://idp.example.com"
        jwks_file = "/etc/airlock/idp-jwks.json"
        {issuer}

        [models.echo]
        engine = "echo"

        [tenants.acme]
        models = ["echo"]
    """)
    )
    return path


def test_issuer_claim_settings_parse(tmp_path: Path) -> None:
    cfg = load(config(tmp_path, 'subject_claim = "email"\ntenant_claim = "org_id"\n'
                                'tenant_map = { "org-123" = "acme", "org-456" = "globex" }'))  # fmt: skip
    issuer = cfg.auth.issuers[0]
    assert (issuer.subject_claim, issuer.tenant_claim) == ("email", "org_id")
    assert issuer.tenant_map == (("org-123", "acme"), ("org-456", "globex"))
    assert load(config(tmp_path, 'tenant = "acme"')).auth.issuers[0].tenant == "acme"


@pytest.mark.parametrize(
    ("lines", "key", "reason"),
    [
        ('tenant = "ACME"', "auth.issuers[0].tenant", "lowercase"),
        ('tenant_map = { "o" = "Acme" }', "auth.issuers[0].tenant_map", "tenant name"),
        ('tenant = "acme"\ntenant_claim = "org"', "auth.issuers[0].tenant", "reads no claim"),
        ('subject_claim = ""', "auth.issuers[0].subject_claim", "claim name"),
        ('groups_claim = "groups"', "auth.issuers[0].groups_claim", "unknown key"),
    ],
)
def test_bad_issuer_claim_settings_are_refused(tmp_path: Path, lines: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(config(tmp_path, lines))
    assert info.value.key == key and reason in info.value.reason
