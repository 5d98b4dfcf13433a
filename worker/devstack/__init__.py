"""The development tools, apart from the service: the local stack (`stack`, reusing what answers
at the configured URLs or starting tansu, PostgreSQL and Redis under `.stack/`), a private stack
on free ports that the fault drills may kill (`private_stack`), an isolated database, topics and
Redis db for the end-to-end tests and benchmarks (`sandbox`), the fault drills (`drills`), the
whole story on the local stack (`demo`) and the `unlearn` verbs that run them (`cli`).

Nothing in the service (`worker.pipeline`, `worker.core`, the model server) imports this package.
"""
