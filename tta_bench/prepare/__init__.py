"""What `prepare` receives and what it keeps (SPEC 2): PrepareData (never the evaluated split), the
one cache for prepared state, and the shared base-model pass over the prepare split."""
