//! TEST ONLY: a 2048-bit RSA key made for the RS256 issuer test with
//! `openssl genrsa 2048`; it signs nothing anywhere else. Committed because
//! neither ring nor rcgen can generate RSA keys.

/// The private key, PKCS#1 DER, standard base64.
pub const PKCS1_DER_BASE64: &str = concat!(
    "MIIEogIBAAKCAQEAomVVqljLI29rMbuIFOL7H+2c1NeQ20IesW7Szhb89D2FxgIzsy19V4vbT0aYPIqwgy7wtolAAbtpAC6r",
    "lLfV9jdmdYlOkIgm4p0ZhsFDTeJUSRwuaZEJkZFF11WJkxVxhLb3dPEfbK55OS2spJD/2ZfIqROpA+D+wU7gPWBMFAQieGW+",
    "lKy1r5ke8n5RuMKVTtvtv7dhFTDg3kZgEvUCZHL2n5qS9BQmUr6GpheseTWARieCgNf7/KSNQv5tixrmGSUzk3lWrk/0IDFZ",
    "Nj0ZBfuW6kP5w7sih2pcxh1bOl0iZeiJ/JKSFDBtIi75qqWV5meVgVclj+DyY7+SmXSglQIDAQABAoIBABycq4j5n4LVBucq",
    "ghmh+zpfIEZs25AR+HvtCXW3naY/r7HZIfhD/8U8ti1jw/9ItTxLuSwEBxO3DBM05dSsRiWdEa+MO1wiLO243a49H0lZ4t1F",
    "upStcejkllBP+Q8B1HAcV4GSWSXKIMAXAMe252kUQc2uUdVF30S6S65sqMLOxlaaBkw2SmuVrYMLanK3rzWqdT4uD4MUPE8u",
    "WL+OkzL7OBIC+oa+/n6jBoG0cgun5YkhJzwrscNZOo8uGfvJIvDRz/5gCcr1CAJGk9mcP5GFvYNGclkyZa89dcYQsgexWjGy",
    "99/vASkURQB8lNGmvHuHG18PIpdhQN3HIwVjIWkCgYEA5VNMbvyCjeVBt0odLhDrBzwCFKEVjfYn7qBXAY3p2Vdf4F8bbTDN",
    "99mhBKsUUPqPm6fMHqdQ3JCL2dEpV/iVkiKYwjsqRFWJ1IIcWpwMPJBgSs3VgON3KGKbcvRnO42UQuv3KhX3cGN/Ngy4wh/+",
    "YFxfkueWUhuP0HXA9fVDUs0CgYEAtUkNQJRdsDnyXuahhfUuhAoF9uF9VTuQLd3PceYpMMPm3yy5jjREUcQaEAMjxsyB5QRf",
    "GHZGyk7Nt0yBHU/715pS5ENI5iCY36/ZldMjyDHj7YkvehCFLxQ0Z7iBBGQKHlAH8Vqn5l1v52btI7uBUmklAZUlqSWPDjVG",
    "ACYPVOkCgYBJkQ9UC21WV9VdF0mFHahICdghBgwEHpNw2b8PoJcEQiNftyL1RFLOz+H3vWonEDpBlPLGYqZuG3DBz3eT4Qsa",
    "dj7LEG/evBIbOiIebzD9vNMnLCDx2AbBzeBQYFc9o42MamY/+gwG4eRNUodyvxC7mOaQGfr/HBhmp1/fh26xgQKBgDwbEXLE",
    "/l8sh0ihzRIeHaMXs6yMTMLSsdYTQfFwr12ExmpeaNNWTwSRMVb3w4fpTHQDRAhXRtdS03AfxHtUhpqQh0U5bdUnH6iipFDB",
    "pY59xCWAo6YkDhRy7YEqMlSjWpt8S3XhaeO+PRkLDjsXsyQAyo1AxzDSzCCY1zG7bL/pAoGARGpiLauQ0a3EBsNOP91WUpZf",
    "T2dkVupJ+lU3u8w6M8S3cMWPkJlH88hUPUss/CCQMoRTotSl0rh+nkirguEqwSsXE/aQwc1aas63OC8dV4DIgAPoahkCu/8b",
    "T2YatH/kq19HtmUnbUqfi7VEiWUl96mMg/bAS9kNbUwdZsz7S0E=",
);

/// Its modulus `n`, base64url (the JWK field); `e` is 65537 (`AQAB`).
pub const MODULUS_BASE64URL: &str = "omVVqljLI29rMbuIFOL7H-2c1NeQ20IesW7Szhb89D2FxgIzsy19V4vbT0aYPIqwgy7wtolAAbtpAC6rlLfV9jdmdYlOkIgm4p0ZhsFDTeJUSRwuaZEJkZFF11WJkxVxhLb3dPEfbK55OS2spJD_2ZfIqROpA-D-wU7gPWBMFAQieGW-lKy1r5ke8n5RuMKVTtvtv7dhFTDg3kZgEvUCZHL2n5qS9BQmUr6GpheseTWARieCgNf7_KSNQv5tixrmGSUzk3lWrk_0IDFZNj0ZBfuW6kP5w7sih2pcxh1bOl0iZeiJ_JKSFDBtIi75qqWV5meVgVclj-DyY7-SmXSglQ";
