;; Traps (unreachable) on every call.
(module
  (memory (export "memory") 1)
  (func (export "warden_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "warden_evaluate") (param i32 i32) (result i64) unreachable))
