;; Like stateful.wat, but every mutable global is exported, so Warden keeps
;; one instance per thread and puts it back after each evaluation. It counts
;; its calls in the global and in memory (below and above the stack region
;; C modules use) and denies from the second on; warden_init leaves a mark
;; that must still be there on every later call. An input starting with "g"
;; grows its memory first (the instance cannot be put back and is dropped),
;; one starting with "t" traps after counting.
(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{\"action\":\"allow\",\"rule\":\"\",\"reason\":\"\"}")
  (data (i32.const 2048) "{\"action\":\"deny\",\"rule\":\"state_survived\",\"reason\":\"saw an earlier call\"}")
  (data (i32.const 3072) "{\"action\":\"deny\",\"rule\":\"init_lost\",\"reason\":\"warden_init's mark is gone\"}")
  (global $calls (export "calls") (mut i32) (i32.const 0))
  (global $next (export "next") (mut i32) (i32.const 8192))
  (func (export "warden_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $len)))
    (local.get $p))
  (func (export "warden_init") (param i32 i32)
    (i32.store (i32.const 600) (i32.const 7)))
  (func (export "warden_evaluate") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 103))
      (then (drop (memory.grow (i32.const 1)))))
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store (i32.const 512) (i32.add (i32.load (i32.const 512)) (i32.const 1)))
    (i32.store (i32.const 60000) (i32.add (i32.load (i32.const 60000)) (i32.const 1)))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 116))
      (then unreachable))
    (if (result i64) (i32.ne (i32.load (i32.const 600)) (i32.const 7))
      (then (i64.or (i64.shl (i64.const 3072) (i64.const 32)) (i64.const 74)))
      (else
        (if (result i64) (i32.or (i32.gt_u (global.get $calls) (i32.const 1))
                                 (i32.or (i32.gt_u (i32.load (i32.const 512)) (i32.const 1))
                                         (i32.gt_u (i32.load (i32.const 60000)) (i32.const 1))))
          (then (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 72)))
          (else (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 40))))))))
