;; Denies every call.
(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{\"action\":\"deny\",\"rule\":\"deny_all\",\"reason\":\"nothing may pass\"}")
  (global $next (mut i32) (i32.const 4096))
  (func (export "warden_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $len)))
    (local.get $p))
  (func (export "warden_evaluate") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 63))))
