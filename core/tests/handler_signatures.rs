//! Wrong handler signatures fail to compile with messages that say what a
//! handler is (`#[diagnostic::on_unimplemented]` on `Handler` and
//! `FromDelivery`); the expected messages are in `tests/ui/*.stderr`
//! (regenerate with `TRYBUILD=overwrite`).

#[test]
fn wrong_handler_signatures_explain_themselves() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
