;; Halts the run of every call (a call in no run is refused).
(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{\"action\":\"halt_run\",\"rule\":\"halt_runs\",\"reason\":\"the run is over\"}")
  (global $next (mut i32) (i32.const 4096))
  (func (export "warden_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $len)))
    (local.get $p))
  (func (export "warden_evaluate") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 67))))
