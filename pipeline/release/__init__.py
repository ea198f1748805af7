"""From a passing candidate to what serves: registration after infra validation (`register`), one
verification path (`verify`), promotion and rollback (`promote`) under the cross-machine guard (`guard`),
and the serving targets behind one interface (`targets`)."""
