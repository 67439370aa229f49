use pushgrid_register::{Listeners, ROLE, RegisterConfig, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Ok(pushgrid_common::cli::role_main::<RegisterConfig, _, _>(
        ROLE,
        |config, shutdown| async move {
            let listeners = Listeners::bind(&config).await?;
            run(config, listeners, shutdown).await
        },
    )
    .await?)
}
