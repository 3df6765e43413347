;; Counts its calls in a global and memory and denies from the second on:
;; with a fresh instance per evaluation it never sees a second call.
(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{\"action\":\"allow\",\"rule\":\"\",\"reason\":\"\"}")
  (data (i32.const 2048) "{\"action\":\"deny\",\"rule\":\"state_survived\",\"reason\":\"saw an earlier call\"}")
  (global $calls (mut i32) (i32.const 0))
  (func (export "warden_alloc") (param i32) (result i32) (i32.const 8192))
  (func (export "warden_evaluate") (param i32 i32) (result i64)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store (i32.const 512) (i32.add (i32.load (i32.const 512)) (i32.const 1)))
    (if (result i64) (i32.or (i32.gt_u (global.get $calls) (i32.const 1))
                             (i32.gt_u (i32.load (i32.const 512)) (i32.const 1)))
      (then (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 72)))
      (else (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 40))))))
